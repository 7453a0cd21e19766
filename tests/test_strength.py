"""The strength policy (``scale``): one meaning for every method, exact norms, the same through every entry point."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.fidelity import module_fidelity, weighted_target
from mergekit_lora.formats import load_adapter
from mergekit_lora.pipeline import merge
from mergekit_lora.strength import Scale, normalize_scale, parse_scale

SUITE = ["examples/suite/script", "examples/suite/polarity", "examples/suite/region"]
SUITE_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, want", [
    ("none", Scale()), ("average", Scale("average")), ("sum", Scale("sum")), ("1.5*average", Scale("average", 1.5)),
    ("0.5 * sum", Scale("sum", 0.5)), (0.3, Scale("none", 0.3)), ("2", Scale("none", 2.0)),
])
def test_scale_forms_parse_and_print_back(value, want):
    got = parse_scale(value)
    assert got == want
    assert parse_scale(str(got)) == got  # the canonical spelling round-trips (recipes, cards)


@pytest.mark.parametrize("bad", ["loud", "-1", "0", "nan", "inf", "0*average", "x*sum", True])
def test_bad_scales_are_one_clear_problem(bad):
    with pytest.raises(ValueError, match="expected|finite number > 0"):
        normalize_scale(bad)


def _inputs():
    return [load_adapter(p) for p in SUITE]


def _norms(folder):
    out = load_adapter(folder)
    return {n: out.units(n).norm() for n in out.module_names()}


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}), ("lego", {}), ("svd", {})])
def test_average_matches_every_module_norm_to_the_exact_average(tmp_path, method, params):
    res = merge(SUITE, method, tmp_path / "m", params=params, scale="average", dtype="float32")
    ins = _inputs()
    n = len(ins)
    for name, got in _norms(tmp_path / "m").items():
        avg = weighted_target([a.units(name, source=i) for i, a in enumerate(ins)], [1 / n] * n).norm()
        assert got == pytest.approx(avg, rel=1e-5), name
    assert res.fidelity["overall"]["energy_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert res.report["strength"].startswith("average")
    card = (tmp_path / "m" / "README.md").read_text()
    assert "## Strength" in card and "`scale: average`" in card


def test_sum_is_n_times_average_and_a_number_multiplies_the_output(tmp_path):
    merge(SUITE, "ties", tmp_path / "avg", params={"density": 0.5}, scale="average", dtype="float32")
    merge(SUITE, "ties", tmp_path / "sum", params={"density": 0.5}, scale="sum", dtype="float32")
    merge(SUITE, "ties", tmp_path / "raw", params={"density": 0.5}, scale="none", dtype="float32")
    merge(SUITE, "ties", tmp_path / "half", params={"density": 0.5}, scale=0.5, dtype="float32")
    avg, tot, raw, half = (_norms(tmp_path / f) for f in ("avg", "sum", "raw", "half"))
    for name in avg:
        assert tot[name] == pytest.approx(3 * avg[name], rel=1e-5)
        assert half[name] == pytest.approx(0.5 * raw[name], rel=1e-6)
    assert not any(math.isclose(raw[n], avg[n], rel_tol=1e-3) for n in avg)  # ties' own output is not the average's


def test_rescaled_fidelity_rows_equal_a_fresh_measurement(tmp_path):
    res = merge(SUITE, "svd", None, scale="1.7*average")
    ins = _inputs()
    for row in res.rows[:12]:
        target = weighted_target([a.units(row.name, source=i) for i, a in enumerate(ins)], [1 / 3] * 3)
        fresh = module_fidelity(row.name, res.merged[row.name], target)
        assert row.error_norm == pytest.approx(fresh.error_norm, rel=1e-5)
        assert row.merged_norm == pytest.approx(fresh.merged_norm, rel=1e-6)


def test_default_weights_are_the_average(tmp_path):
    merge(SUITE, "linear", tmp_path / "default")
    merge(SUITE, "linear", tmp_path / "third", weights=[1 / 3] * 3)
    a, b = load_adapter(tmp_path / "default"), load_adapter(tmp_path / "third")
    for name in a.module_names():
        assert torch.equal(a.units(name).B, b.units(name).B)


def test_cli_scale_flag_recipe_round_trip_and_methods_listing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = [str((SUITE_ROOT / p).resolve()) for p in SUITE]
    run = CliRunner().invoke
    r = run(app, ["merge", *src, "-m", "ties", "--density", "0.5", "--scale", "1.5*average", "-o", "cli",
                  "--emit-recipe", "r.yaml"])
    assert r.exit_code == 0, r.output
    assert "scale: 1.5*average" in (tmp_path / "r.yaml").read_text()
    first = (tmp_path / "cli" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace("path: cli", "path: again"))
    r = run(app, ["run", "r.yaml"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == first
    r = run(app, ["merge", *src, "--scale", "loud", "-o", "bad"])
    assert r.exit_code == 2 and "scale" in r.output and not (tmp_path / "bad").exists()
    listed = {m["name"]: m for m in json.loads(run(app, ["methods", "--json"]).output)}
    assert listed["route"]["default_scale"] == "sum" and "default_scale" in listed["ties"]


