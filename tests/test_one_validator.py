"""One validator per fact, one wording (issue 24): a NaN/Inf number is reported once, as not finite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError
from mergekit_lora.cli.main import app
from mergekit_lora.errors import PlanErrors, not_finite
from mergekit_lora.pipeline import MergeRequest, make_options, plan
from mergekit_lora.recipe import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
A, B = (str(ROOT / "examples" / "suite" / t) for t in ("topic", "sentiment"))
WORDING = "is not a finite number; NaN and Inf cannot be merged, give a finite value"


def _recipe(method: str, parameters: str, out: Path, weight: str = "0.5") -> str:
    return (f"method: {method}\nadapters:\n  - source: {A}\n    weight: {weight}\n  - source: {B}\n"
            f"parameters: {parameters}\noutput:\n  path: {out}\n")


def _problems(text: str) -> list[str]:
    with pytest.raises(LoraMergeError) as e:
        validate_recipe(text)
    msg = str(e.value)
    return [ln for ln in msg.splitlines() if ln.startswith("  - ")] or [msg]


@pytest.mark.parametrize(("method", "parameters", "field"), [
    ("ties", "{density: .nan, rank: 8}", "parameters.density"),
    ("lego", "{k_ratio: .nan}", "parameters.k_ratio"),
    ("ties", "{density: [0.5, .inf]}", "parameters.density"),
])
def test_recipe_nan_parameter_is_one_problem(tmp_path, method, parameters, field):
    problems = _problems(_recipe(method, parameters, tmp_path / "out"))
    assert len(problems) == 1, problems
    assert f"{field} {WORDING}" in problems[0]
    assert "less than or equal" not in problems[0]


def test_recipe_nan_weight_has_the_same_wording(tmp_path):
    problems = _problems(_recipe("linear", "{}", tmp_path / "out", weight=".nan"))
    assert len(problems) == 1 and f"adapters[0].weight {WORDING}" in problems[0], problems


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan"])
def test_plan_reports_a_nan_parameter_once(tmp_path, value):
    with pytest.raises(LoraMergeError) as e:
        plan(MergeRequest(sources=[A, B], method="ties", params={"density": value, "rank": 8},
                          options=make_options(out=tmp_path / "o")))
    assert not isinstance(e.value, PlanErrors), str(e.value)
    assert str(e.value) == not_finite("parameters.density")


@pytest.mark.parametrize("args", [["--density", "nan"], ["-p", "density=nan"], ["-p", "density=.inf"]])
def test_cli_nan_parameter_is_one_line(tmp_path, args):
    r = CliRunner().invoke(app, ["merge", A, B, "-m", "ties", "--rank", "8", *args, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert f"error: parameters.density {WORDING}" in r.output, r.output
    assert "problems" not in r.output and "less than or equal" not in r.output


def _recipe_problem(text: str) -> str:
    problems = _problems(text)
    assert len(problems) == 1, problems
    return problems[0].split("): ", 1)[1]


def test_dtype_has_one_validator_and_one_wording(tmp_path):
    from mergekit_lora.options import check_dtype
    from mergekit_lora.pipeline import resolve_dtype

    with pytest.raises(ValueError) as want:
        check_dtype("fp8")
    with pytest.raises(LoraMergeError) as opts:
        make_options(dtype="fp8")
    with pytest.raises(LoraMergeError) as resolved:
        resolve_dtype("fp8", [])
    text = _recipe("linear", "{}", tmp_path / "out").replace("output:\n", "output:\n  dtype: fp8\n")
    assert str(want.value) in str(opts.value)
    assert str(resolved.value) == str(want.value) == _recipe_problem(text)


@pytest.mark.parametrize("device", ["tpu", "cudax", "cuda:x"])
def test_device_has_one_validator_and_one_wording(tmp_path, device):
    from mergekit_lora.options import check_device
    from mergekit_lora.pipeline import resolve_device

    with pytest.raises(ValueError) as want:
        check_device(device)
    with pytest.raises(LoraMergeError) as opts:
        make_options(device=device)
    with pytest.raises(LoraMergeError) as resolved:  # was a RuntimeError from torch for "cudax"
        resolve_device(device)
    text = _recipe("linear", "{}", tmp_path / "out") + f"device: {device}\n"
    assert str(want.value) in str(opts.value)
    assert str(resolved.value) == str(want.value) == _recipe_problem(text)


def test_weight_count_has_one_wording(tmp_path):
    from mergekit_lora.evals.fidelity import fidelity_report

    want = "got 3 weights for 2 adapters; give one weight per adapter"
    with pytest.raises(LoraMergeError, match=want):
        plan(MergeRequest(sources=[A, B], method="linear", weights=[1, 1, 1], options=make_options(out=tmp_path / "o")))
    with pytest.raises(LoraMergeError, match=want):
        fidelity_report(A, [A, B], [1, 1, 1])
    text = _recipe("linear", "{}", tmp_path / "out") + "modules:\n  - match: '*'\n    weights: [1, 1, 1]\n"
    assert _recipe_problem(text) == want


def test_existing_output_has_one_wording(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    want = f"{out} already exists; choose another output or pass --force to replace it"
    merge = CliRunner().invoke(app, ["merge", A, B, "-m", "linear", "-o", str(out)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe("linear", "{}", out))
    run = CliRunner().invoke(app, ["run", str(recipe)])
    assert merge.exit_code == run.exit_code == 2
    assert want in " ".join(merge.output.split()), merge.output
    assert want in " ".join(run.output.split()), run.output


def test_changed_options_are_validated():
    """The core changes options with make_options (validated), never model_copy(update=...) (not validated)."""
    opts = make_options(seed=1)
    with pytest.raises(LoraMergeError, match="unknown device 'tpu'"):
        make_options(opts, device="tpu")
    for path in sorted((ROOT / "mergekit_lora").rglob("*.py")):
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not any("model_copy(update" in ln.split("#")[0] for ln in code), path
