"""evals.fidelity equals its dense definitions, and the identities hold (one input at weight 1; cat)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import make_peft_adapter
from typer.testing import CliRunner

from mergekit_lora import load_adapter, merge
from mergekit_lora.adapter import Adapter, AdapterMeta
from mergekit_lora.cli.main import app
from mergekit_lora.evals.fidelity import effective_rank, fidelity_report
from mergekit_lora.units import RankUnits


def _adapter(seed: int, shapes: dict[str, tuple[int, int, int]]) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    units = {n: RankUnits.from_factors(torch.randn(r, i, generator=g, dtype=torch.float64),
                                       torch.randn(o, r, generator=g, dtype=torch.float64), scale=0.7)
             for n, (o, i, r) in shapes.items()}
    return Adapter.from_units(units, AdapterMeta("memory", dtype=torch.float64), label=f"a{seed}")


SHAPES = {"m.0.q": (12, 9, 3), "m.0.v": (7, 9, 2), "m.1.q": (12, 9, 4)}


def _dense(a: Adapter, name: str) -> torch.Tensor:
    return a.units(name).delta() if name in a else torch.zeros(SHAPES[name][:2], dtype=torch.float64)


def test_metrics_equal_dense_definitions():
    a, b = _adapter(1, SHAPES), _adapter(2, SHAPES)
    c = _adapter(3, {k: v for k, v in SHAPES.items() if k != "m.0.v"})  # a module missing counts as 0
    merged = _adapter(4, {k: (o, i, 5) for k, (o, i, _) in SHAPES.items()})
    w = [0.5, -1.25, 2.0]
    rep = fidelity_report(merged, [a, b, c], w)
    ins = [a, b, c]
    e2 = t2 = m2 = 0.0
    inner = [0.0] * 3
    in2 = [0.0] * 3
    for row in rep.modules:
        M = _dense(merged, row.name)
        D = [_dense(x, row.name) for x in ins]
        T = sum(wi * d for wi, d in zip(w, D))
        assert row.rel_error == pytest.approx(float((M - T).norm() / T.norm()), rel=1e-6)
        assert row.energy == pytest.approx(float(M.norm() ** 2 / T.norm() ** 2), rel=1e-6)
        for i, d in enumerate(D):
            if d.norm() == 0:
                assert row.cos[i] == 0.0 and math.isinf(row.projection[i]) or row.projection[i] == 0.0
                continue
            assert row.cos[i] == pytest.approx(float((M * d).sum() / (M.norm() * d.norm())), rel=1e-6)
            assert row.projection[i] == pytest.approx(float((M * d).sum() / d.norm() ** 2), rel=1e-6)
        s = torch.linalg.svdvals(M)
        s = s[s > 1e-12 * s.max()]
        p = s / s.sum()
        assert row.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
        e2 += float((M - T).norm() ** 2)
        t2 += float(T.norm() ** 2)
        m2 += float(M.norm() ** 2)
        for i, d in enumerate(D):
            inner[i] += float((M * d).sum())
            in2[i] += float(d.norm() ** 2)
    o = rep.overall
    assert o["modules"] == 3
    assert o["rel_error"] == pytest.approx((e2 / t2) ** 0.5, rel=1e-6)
    assert o["energy"] == pytest.approx(m2 / t2, rel=1e-6)
    for i in range(3):
        assert o["cos"][i] == pytest.approx(inner[i] / (m2 * in2[i]) ** 0.5, rel=1e-6)
        assert o["projection"][i] == pytest.approx(inner[i] / in2[i], rel=1e-6)


def test_effective_rank_identities():
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0])) == pytest.approx(3.0, abs=1e-12)
    assert effective_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0, abs=1e-12)
    assert effective_rank(torch.zeros(3)) == 0.0


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    a = make_peft_adapter(d / "a", seed=1)
    b = make_peft_adapter(d / "b", seed=2, r=2, target_modules=["q_proj", "k_proj"])
    return d, a, b


def test_identity_one_input_weight_one(peft_pair):
    d, a, _ = peft_pair
    merge([a], "linear", d / "one", weights=[1.0], force=True)
    o = fidelity_report(d / "one", [a], [1.0]).overall
    assert o["rel_error"] < 1e-6
    assert o["energy"] == pytest.approx(1.0, abs=1e-6)
    assert o["cos"][0] == pytest.approx(1.0, abs=1e-6)
    assert o["projection"][0] == pytest.approx(1.0, abs=1e-6)
    # the effective rank of a rank-4 adapter is at most 4 and above 1 for random factors
    assert 1.0 < o["effective_rank"] <= 4.0 + 1e-9


def test_identity_cat_of_all_inputs(peft_pair):
    d, a, b = peft_pair
    merge([a, b], "cat", d / "cat", weights=[0.5, 2.0], force=True)
    rep = fidelity_report(d / "cat", [a, b], [0.5, 2.0])
    assert rep.overall["rel_error"] < 1e-6
    assert rep.overall["energy"] == pytest.approx(1.0, abs=1e-6)
    assert all(r.rel_error < 1e-6 for r in rep.modules)
    assert {r.name.split(".")[-1] for r in rep.modules} == {"q_proj", "k_proj", "v_proj"}
    # a merge that drops b entirely keeps none of b: projection 0 on modules only b has
    rep_a = fidelity_report(a, [a, b], [0.5, 2.0])
    assert rep_a.overall["projection"][0] == pytest.approx(1.0, abs=1e-6)
    assert rep_a.overall["rel_error"] > 0.1


def test_cli_fidelity_json_and_errors(peft_pair):
    d, a, b = peft_pair
    merge([a, b], "linear", d / "lin", weights=[1, 1], force=True)
    r = CliRunner().invoke(app, ["eval", "fidelity", str(d / "lin"), "--against", str(a), "--against", str(b),
                                 "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["overall"]["rel_error"] < 1e-6 and len(data["modules"]) == len(load_adapter(d / "lin"))
    r = CliRunner().invoke(app, ["eval", "fidelity", str(d / "lin"), "--against", str(a)])
    assert r.exit_code == 0 and "overall" in r.output
    r = CliRunner().invoke(app, ["eval", "fidelity", str(d / "lin"), "--against", str(a), "--weights", "1,2"])
    assert r.exit_code == 2 and "weights" in r.output
    r = CliRunner().invoke(app, ["eval", "fidelity", str(d / "missing"), "--against", str(a)])
    assert r.exit_code == 2 and "missing" in r.output


def test_fidelity_plot_grid_and_png(peft_pair, tmp_path):
    """--plot writes a real PNG; the grid it draws holds the report's per-module numbers."""
    import matplotlib.image

    from mergekit_lora.evals.fidelity_plot import fidelity_grid

    d, a, b = peft_pair
    rep = fidelity_report(a, [a, b], [0.5, 2.0])  # a alone: q/k modules lose b, v_proj keeps a at 2x energy
    g = fidelity_grid(rep)
    assert g.types == ["k_proj", "q_proj", "v_proj"] and g.layers == ["0", "1"]
    for r in rep.modules:
        t, layer = r.name.split(".")[-1], r.name.split(".")[2]
        assert g.rel_error[g.types.index(t)][g.layers.index(layer)] == pytest.approx(r.rel_error, rel=1e-9)
        assert g.energy[g.types.index(t)][g.layers.index(layer)] == pytest.approx(r.energy, rel=1e-9)
    out = tmp_path / "fid.png"
    r = CliRunner().invoke(app, ["eval", "fidelity", str(a), "--against", str(a), "--against", str(b),
                                 "--weights", "0.5,2", "--plot", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(str(out))
    assert img.shape[0] > 200 and img.shape[1] > 300
    colours = {tuple(px) for px in (img[..., :3] * 255).astype(int).reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 50  # two heatmaps, colour bars and text, not a blank canvas
