"""Torch only where it computes (issue 25, item 1).

Planning (every plan-stage error), ``inspect`` of any single file and the ``linear``/``cat`` merges run
without importing torch (a fresh interpreter reports ``sys.modules``), and the numpy path writes the
same bytes as the torch path on the same plan: real example adapters and random ones in every factor
dtype, mixed ranks and alphas, rsLoRA, embeddings, GPT-2 Conv1D, convs, kohya and diffusers files, every
output dtype, the portable profile.  The bfloat16 rounding itself is checked against torch bit for bit.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_peft_adapter
from safetensors.torch import load_file, save_file
from sd_helpers import diffusers_state_dict, kohya_state_dict, save
from test_peft_read import CASES
from test_startup import run_fresh

from mergekit_lora.arrays import bf16_bits, from_bf16_bits, promote, store
from mergekit_lora.options import MergeOptions
from mergekit_lora.pipeline import MergeRequest, execute, plan

execute_module = importlib.import_module("mergekit_lora.pipeline.execute")  # the module (the package exports the function)

ROOT = Path(__file__).resolve().parents[1]
SUITE = [ROOT / "examples" / "suite" / t for t in ("topic", "genre", "sentiment")]
TINY = [ROOT / "examples" / t for t in ("tiny-llama-double", "tiny-llama-shift")]


def _retyped(path: Path, dtype: torch.dtype) -> Path:
    w = path / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(w)).items()}, str(w), metadata={"format": "pt"})
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _both_paths(tmp_path: Path, monkeypatch, sources, method: str, params=None, weights=None, **opts):
    """Merge once on numpy factors and once on torch tensors (same plan); return both folders' digests."""
    out = {}
    for name, arrays in (("arrays", True), ("torch", False)):
        p = plan(MergeRequest(sources=[str(s) for s in sources], method=method, params=params or {}, weights=weights,
                              options=MergeOptions(out=tmp_path / name, **opts)))
        assert execute_module.runs_on_arrays(p)
        with monkeypatch.context() as m:
            if not arrays:
                m.setattr(execute_module, "runs_on_arrays", lambda _p: False)
            execute(p)
        out[name] = _digest(tmp_path / name)
    return out


# ---------------------------------------------------------------------------------------------- no torch

def _sd_files(tmp_path: Path, dtype: torch.dtype = torch.float32) -> list[Path]:
    k = {n: v.to(dtype) if v.ndim else v for n, v in kohya_state_dict(seed=1).items()}
    d = {n: v.to(dtype) for n, v in diffusers_state_dict(seed=2).items()}
    return [save(tmp_path / "k.safetensors", k), save(tmp_path / "d.safetensors", d)]


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_import_no_torch_and_write(tmp_path, method):
    r = run_fresh("merge", *SUITE, "-m", method, "--weights", "0.5,-0.25,1", "-o", tmp_path / "out")
    assert r["exit"] == 0, r["output"]
    assert r["torch"] is False
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_sd_linear_imports_no_torch(tmp_path):
    k, d = _sd_files(tmp_path)
    r = run_fresh("merge", k, d, "-m", "linear", "-o", tmp_path / "out")
    assert r["exit"] == 0, r["output"]
    assert r["torch"] is False


def test_methods_that_compute_still_load_torch(tmp_path):
    """The array path is a declaration of the method, not a guess: svd and linear with a rank use torch."""
    cases = (["-m", "svd", "--rank", "4"], ["-m", "linear", "--rank", "4"], ["-m", "linear", "--scale", "average"])
    for i, args in enumerate(cases):
        r = run_fresh("merge", *SUITE[:2], *args, "-o", tmp_path / str(i))
        assert r["exit"] == 0, r["output"]
        assert r["torch"] is True, args


def _inspect_targets(tmp_path: Path) -> dict[str, Path]:
    k, d = _sd_files(tmp_path, torch.bfloat16)
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return {"peft-folder": SUITE[0], "peft-file": SUITE[0] / "adapter_model.safetensors", "kohya": k,
            "diffusers": d, "gguf": gguf}


@pytest.mark.parametrize("target", ["peft-folder", "peft-file", "kohya", "diffusers", "gguf"])
def test_inspect_of_any_single_file_imports_no_torch(tmp_path, target):
    path = _inspect_targets(tmp_path)[target]
    r = run_fresh("inspect", path, "--json")
    assert r["exit"] == (2 if target == "gguf" else 0), r["output"]
    assert r["torch"] is False


def _plan_errors(tmp_path: Path) -> dict[str, list[str]]:
    other = make_peft_adapter(tmp_path / "gpt2", "gpt2", r=4, lora_alpha=8, target_modules=["c_attn"],
                              fan_in_fan_out=True)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "exists"
    out.mkdir()
    a, b = str(SUITE[0]), str(SUITE[1])
    return {
        "method": ["merge", a, b, "-m", "tiess"],
        "parameter": ["merge", a, b, "-m", "linear", "--rank", "-1"],
        "weights": ["merge", a, b, "--weights", "1,2,3"],
        "dtype": ["merge", a, b, "--dtype", "fp8"],
        "device": ["merge", a, b, "--device", "cuda"],
        "missing": ["merge", a, b + "x"],
        "output-exists": ["merge", a, b, "-o", str(out)],
        "output-is-input": ["merge", a, b, "-o", a],
        "not-safetensors": ["merge", a, str(bad), "-o", str(tmp_path / "o")],
        "other-base": ["merge", a, str(ROOT / "examples" / "tiny-llama-double"), "-o", str(tmp_path / "o2")],
        "other-family": ["merge", a, str(other), "--missing", "error", "-o", str(tmp_path / "o4")],
        "recipe": ["run", str(tmp_path / "nope.yaml")],
        # a method that computes (torch) loads its class only after every header check
        "ties-parameter": ["merge", a, b, "-m", "ties", "--density", "2"],
        "ties-other-base": ["merge", a, str(ROOT / "examples" / "tiny-llama-double"), "-m", "ties", "-o",
                            str(tmp_path / "o5")],
        "route-output-format": ["merge", a, b, "-m", "route", "--format", "kohya", "-o", str(tmp_path / "o6")],
        "gguf-without-base": ["merge", a, b, "-m", "svd", "--format", "gguf", "-o", str(tmp_path / "o7")],
    }


def test_plan_stage_errors_import_no_torch(tmp_path):
    """Every stage of plan(): the request, the sources' headers, the inputs together, the output format."""
    for name, args in _plan_errors(tmp_path).items():
        r = run_fresh(*args)
        assert r["exit"] == 2, (name, r["output"])
        assert r["output"].startswith("error:"), (name, r["output"])
        assert r["torch"] is False, (name, r["output"])


# ---------------------------------------------------------------------------------------------- same bytes

def test_examples_same_bytes_on_both_paths(tmp_path, monkeypatch):
    for i, (srcs, method, weights, opts) in enumerate([
        (SUITE, "linear", [0.5, -0.3, 0.8], {}),
        (SUITE, "cat", None, {"dtype": "bfloat16"}),
        (SUITE, "linear", [1 / 3] * 3, {"dtype": "float32"}),
        (TINY, "cat", [1, 0.5], {}),
        (TINY, "linear", [0.7, 0.3], {"profile": "portable"}),
    ]):
        got = _both_paths(tmp_path / str(i), monkeypatch, srcs, method, weights=weights, **opts)
        assert got["arrays"] == got["torch"], (srcs, method, opts)


FACTOR_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("out_dtype", [None, "bfloat16", "float16"])
def test_random_adapters_same_bytes_in_every_dtype(tmp_path, monkeypatch, dtype, out_dtype):
    """Mixed ranks, unequal alphas (one rsLoRA), per-module rank patterns, negative and unequal weights."""
    a = _retyped(make_peft_adapter(tmp_path / "a", "llama", seed=1, r=4, lora_alpha=8), dtype)
    b = _retyped(make_peft_adapter(tmp_path / "b", "llama", seed=2, r=8, lora_alpha=3, use_rslora=True), dtype)
    c = _retyped(make_peft_adapter(tmp_path / "c", "llama", seed=3, **CASES["llama-patterns"][1]), dtype)
    for method in ("linear", "cat"):
        got = _both_paths(tmp_path / method, monkeypatch, [a, b, c], method, weights=[0.6, -1.3, 0.25],
                          dtype=out_dtype, missing="union")
        assert got["arrays"] == got["torch"], method


@pytest.mark.parametrize("case", ["llama-embedding", "gpt2-conv1d", "bert-embedding", "conv2d"])
def test_module_kinds_same_bytes(tmp_path, monkeypatch, case):
    model, kw = CASES[case]
    a = make_peft_adapter(tmp_path / "a", model, seed=1, **kw)
    b = _retyped(make_peft_adapter(tmp_path / "b", model, seed=2, **kw), torch.bfloat16)
    got = _both_paths(tmp_path / "m", monkeypatch, [a, b], "linear", weights=[0.3, 0.9])
    assert got["arrays"] == got["torch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kohya_and_diffusers_same_bytes(tmp_path, monkeypatch, dtype):
    k, d = _sd_files(tmp_path, dtype)
    k2 = save(tmp_path / "k2.safetensors", {n: (v.to(dtype) if v.ndim else torch.tensor(3.0))
                                            for n, v in kohya_state_dict(seed=5, r=2).items()})
    for i, (srcs, out_dtype) in enumerate([([k, d], None), ([k, k2], "bfloat16"), ([d, d], None)]):
        got = _both_paths(tmp_path / str(i), monkeypatch, srcs, "linear", weights=[0.4, 0.8], dtype=out_dtype)
        assert got["arrays"] == got["torch"], (srcs, out_dtype)


def test_bfloat16_rounding_is_torchs():
    """Round to nearest even at every boundary class: ties, subnormals, the overflow edge (NaN is never
    stored: outputs are checked finite before the writer)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(200_000) * np.exp(rng.uniform(-95, 88, 200_000))).astype(np.float32)
    u = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = ((u & ~np.uint32(0xFFFF)) | np.uint32(0x8000)).view(np.float32)  # exactly half-way
    edge = np.array([3.3895e38, 3.3896e38, 3.4e38, -3.39e38, 1e-45, -1e-45, 0.0, -0.0, np.inf, -np.inf], np.float32)
    for v in (x, ties[np.isfinite(ties)], edge):
        with np.errstate(over="ignore", invalid="ignore"):
            ours = bf16_bits(v)
        theirs = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(ours, theirs)
    b = bf16_bits(x)
    assert np.array_equal(from_bf16_bits(b), torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).float().numpy())
    x64 = rng.standard_normal(10_000) * 1e3
    assert np.array_equal(store(x64, "bfloat16").data,
                          torch.from_numpy(x64).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_promote_is_torchs():
    names = ["float16", "bfloat16", "float32", "float64"]
    for a in names:
        for b in names:
            want = torch.promote_types(getattr(torch, a), getattr(torch, b))
            assert promote(a, b) == str(want).removeprefix("torch."), (a, b)


def test_catalogue_entries_describe_their_class():
    """plan() decides from the torch-free entry; the loaded class must say the same (name, Params, strength,
    output format)."""
    from mergekit_lora.registry import available

    for name, entry in available().items():
        cls = entry.load()
        assert (cls.name, cls.Params, cls.default_scale, cls.output_format) == (
            entry.name, entry.Params, entry.default_scale, entry.output_format), name
    assert available()["route"].output_format == "routed"
