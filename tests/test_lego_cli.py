"""LoRA-LEGO through the pipeline and the CLI: PEFT loads the output, bytes are reproducible, the driver
batches across layers and uses LEGO's own fidelity rows, --report, the default k (the math: test_lego.py)."""

import json

import pytest
import torch
from helpers import make_peft_adapter, peft_deltas, rel
from typer.testing import CliRunner

from mergekit_lora import load_adapter, merge
from mergekit_lora.registry import get_algorithm

_lego = get_algorithm("lego")


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("lego")
    a = make_peft_adapter(d / "a", "llama", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    b = make_peft_adapter(d / "b", "llama", seed=2, r=8, lora_alpha=16, use_rslora=True,
                          target_modules=["q_proj", "v_proj", "o_proj"])
    return a, b


def test_output_loads_in_peft_and_matches_our_delta(tmp_path, two_adapters):
    out = tmp_path / "out"
    merge(list(two_adapters), "lego", out, params={"k": 5, "reweight": "lsq"}, weights=[1.0, 0.5])
    merged = load_adapter(out)
    ours = {n: merged.units(n).delta_weight() for n in merged.module_names()}
    theirs = peft_deltas(out)
    assert len(theirs) == len(ours)  # PEFT sees a non-zero update on every merged module
    for n, d in ours.items():
        key = next(k for k in theirs if k.endswith(n))
        assert rel(theirs[key], d) < 1e-5
    assert all(merged.modules[n].rank == 5 for n in merged.module_names())
    card = (out / "README.md").read_text()
    assert "LoRA-LEGO reweighting" in card and "| paper | **lsq** | none |" in card


def test_same_seed_same_bytes(tmp_path, two_adapters):
    for name in ("x", "y"):
        merge(list(two_adapters), "lego", tmp_path / name, params={"k": 3}, seed=5)
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "y" / "adapter_model.safetensors").read_bytes()


def test_cli_cluster_k16_on_examples_is_exact_with_lsq_and_reports(tmp_path):
    """k ≥ pooled rank keeps every unit; lsq then gives the average exactly (LEGO's weights are relative, so
    the default weights 1 mean the average; the paper option would give √(r/k)·Σ ΔWᵢ here)."""
    from mergekit_lora.cli.main import app

    runner = CliRunner()
    out = tmp_path / "lego"
    res = runner.invoke(app, ["cluster", "examples/tiny-llama-shift", "examples/tiny-llama-double", "-k", "16",
                              "--reweight", "lsq", "--scale", "none", "-o", str(out), "--report"])
    assert res.exit_code == 0, res.output
    a, b = load_adapter("examples/tiny-llama-shift"), load_adapter("examples/tiny-llama-double")
    m = load_adapter(out)
    for n in a.module_names():
        assert rel(m.units(n).delta(), (a.units(n).delta() + b.units(n).delta()) / 2) < 1e-6
    png = (out / "lego_report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a real picture, not an empty canvas
    from matplotlib.image import imread

    img = imread(out / "lego_report.png")
    assert img.shape[0] > 200 and float(img[..., :3].std()) > 0.05  # something was drawn
    rep = json.loads((out / "lego_report.json").read_text())
    mod = next(iter(rep["modules"].values()))
    assert mod["exact"] and mod["pool"] == 12 and sum(mod["sizes"]) == 12
    # errors: one line, exit 2, nothing written
    for args in (["-k", "2", "--k-ratio", "0.5", "-o", str(tmp_path / "e1")], ["-k", "4", "--backend", "nope", "-o", str(tmp_path / "e2")],
                 ["-k", "4", "-o", str(out)]):
        r = runner.invoke(app, ["cluster", "examples/tiny-llama-shift", "examples/tiny-llama-double", *args])
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()
    r = runner.invoke(app, ["merge", "examples/tiny-llama-shift", "examples/tiny-llama-double", "--method", "lego",
                            "-p", "k=3", "-p", "reweight=none", "-o", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert load_adapter(tmp_path / "m").modules["model.layers.0.self_attn.q_proj"].rank == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path, two_adapters):
    cpu = merge(list(two_adapters), "lego", tmp_path / "cpu", params={"k": 4}, device="cpu")
    gpu = merge(list(two_adapters), "lego", tmp_path / "gpu", params={"k": 4}, device="cuda")
    assert gpu.fidelity["overall"]["rel_error"] == pytest.approx(cpu.fidelity["overall"]["rel_error"], rel=1e-3)


def test_driver_batches_across_layers_and_uses_lego_fidelity(tmp_path, two_adapters):
    """batch_modules only changes how modules are grouped (q/v/o interleave per layer, the driver groups
    same shapes across layers): the merge is the same; LEGO's own fidelity rows equal a fresh
    factor-space measurement of the written output against LEGO's target Σ wᵢ ΔWᵢ / Σ |wᵢ| (weights 1, 0.5
    are the relative weights 2/3, 1/3)."""
    from mergekit_lora.fidelity import module_fidelity, weighted_target

    seen = []
    cls = type(_lego)
    orig = cls.merge_batch

    def spy(self, units, weights, params, ctxs):
        seen.append([c.name for c in ctxs])
        return orig(self, units, weights, params, ctxs)

    cls.merge_batch = spy
    try:
        r8 = merge(list(two_adapters), "lego", tmp_path / "b8", params={"k": 5, "batch_modules": 8}, weights=[1.0, 0.5])
    finally:
        cls.merge_batch = orig
    r1 = merge(list(two_adapters), "lego", tmp_path / "b1", params={"k": 5, "batch_modules": 1}, weights=[1.0, 0.5])
    a8, a1 = load_adapter(tmp_path / "b8"), load_adapter(tmp_path / "b1")
    ins = [load_adapter(p) for p in two_adapters]
    layer = {n: n.split(".layers.")[1].split(".")[0] for n in a8.module_names()}
    assert any(len({layer[n] for n in b}) > 1 for b in seen)  # batches span layers
    for b in seen:  # and hold one shape each
        assert len({(ins[0].modules[n].d_out, ins[0].modules[n].d_in) for n in b}) == 1
    rows = {row.name: row for row in r8.rows}
    assert len(rows) == len(a8.module_names())
    for n in a8.module_names():
        assert rel(a8.units(n).delta(), a1.units(n).delta()) < 1e-5
        fresh = module_fidelity(n, a8.units(n).to(dtype=torch.float64),
                                weighted_target([i.units(n).to(dtype=torch.float64) for i in ins], [1 / 1.5, 0.5 / 1.5]))
        assert rows[n].error_norm == pytest.approx(fresh.error_norm, rel=1e-4)
        assert rows[n].target_norm == pytest.approx(fresh.target_norm, rel=1e-5)
    assert r1.fidelity["overall"]["rel_error"] == pytest.approx(r8.fidelity["overall"]["rel_error"], rel=1e-5)


def test_default_k_is_the_inputs_largest_rank(tmp_path):
    """Like the paper's k = r: rank-4 and rank-8 inputs give rank-8 modules when -k is not given."""
    from mergekit_lora.cli.main import app

    res = CliRunner().invoke(app, ["cluster", "examples/tiny-llama-shift", "examples/tiny-llama-double",
                              "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert {i.rank for i in load_adapter(tmp_path / "o").modules.values()} == {8}
