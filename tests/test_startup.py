"""`loramerge methods`, `--help`s and `inspect` of a PEFT folder run without importing torch (issue 15, item 3),
and the torch-free inspect reports what the torch path and PEFT itself say.

Behaviour only: each command runs in a fresh interpreter that reports whether ``torch`` is in
``sys.modules`` afterwards.  The CPU times are in evals/bench/RESULTS-startup.md.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_peft_adapter, peft_deltas
from safetensors.torch import load_file, save_file
from test_peft_read import CASES

from mergekit_lora import load_adapter, registry
from mergekit_lora.inspect import inspect_adapter, is_peft_safetensors
from mergekit_lora.registry import Algorithm, AlgorithmParams, available, get_algorithm, register

_FRESH = """
import json, sys
from typer.testing import CliRunner
from mergekit_lora.cli.main import app
r = CliRunner().invoke(app, json.loads(sys.argv[1]))
print(json.dumps({"exit": r.exit_code, "torch": "torch" in sys.modules, "output": r.output}))
"""


def run_fresh(*args: str | Path) -> dict:
    """Run the CLI with ``args`` in a new interpreter: exit code, output, and whether torch got imported."""
    p = subprocess.run([sys.executable, "-c", _FRESH, json.dumps([str(a) for a in args])], capture_output=True,
                       text=True, timeout=300, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def assert_close(a, b, path="report", rel=1e-12):
    """Equal structure and values; floats within ``rel``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]", rel)
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=rel, abs_tol=0.0), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_methods_lists_every_algorithm_without_torch():
    r = run_fresh("methods", "--json")
    assert r["exit"] == 0, r["output"]
    assert r["torch"] is False
    assert json.loads(r["output"]) == [e.describe() for e in available().values()]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["merge", "--help"], ["merge"], ["cluster", "--help"]])
def test_help_version_and_usage_errors_import_no_torch(args):
    r = run_fresh(*args)
    assert r["exit"] == (2 if args == ["merge"] else 0), r["output"]
    assert r["torch"] is False


def test_catalogue_entries_are_their_classes():
    """Each built-in's entry (what `methods` shows) is what its class merges with."""
    for name, entry in available().items():
        cls = entry.load()
        assert (cls.name, cls.description, cls.Params) == (name, entry.description, entry.Params)
        assert cls().describe() == entry.describe()
        assert isinstance(get_algorithm(name), cls)


def test_registered_class_is_listed_and_loaded(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTERED", {})  # this process's registrations end with the test

    class ScaleParams(AlgorithmParams):
        factor: float = 1.0

    class Scale(Algorithm[ScaleParams]):
        name = "test_startup_scale"
        description = "scales"
        Params = ScaleParams

    register(Scale)
    entry = available()["test_startup_scale"]
    assert entry.Params is ScaleParams and entry.load() is Scale
    assert isinstance(get_algorithm("test_startup_scale"), Scale)


def test_inspect_of_a_peft_folder_imports_no_torch_and_equals_the_torch_path(tmp_path):
    path = make_peft_adapter(tmp_path / "a", "llama", r=4, lora_alpha=8)
    r = run_fresh("inspect", path, "--json", "--modules")
    assert r["exit"] == 0, r["output"]
    assert r["torch"] is False
    loaded = inspect_adapter(load_adapter(path, strict=False, ignore_modules_to_save=True))
    assert_close(json.loads(r["output"]), json.loads(json.dumps(loaded, default=str)))


def _retyped(tmp_path: Path, dtype: torch.dtype) -> Path:
    path = make_peft_adapter(tmp_path / str(dtype), "llama", r=4, lora_alpha=8)
    w = path / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(w)).items()}, str(w), metadata={"format": "pt"})
    return path


def _with_extras(tmp_path: Path) -> Path:
    """modules_to_save tensors and a key PEFT does not write: inspect lists them instead of failing."""
    path = make_peft_adapter(tmp_path / "extras", "llama", r=4, lora_alpha=8, modules_to_save=["lm_head"])
    w = path / "adapter_model.safetensors"
    t = load_file(str(w))
    t["base_model.model.model.layers.0.self_attn.q_proj.mystery"] = torch.ones(3)
    save_file(t, str(w), metadata={"format": "pt"})
    return path


VARIANTS = {
    **{c: lambda tmp, c=c: make_peft_adapter(tmp / c, CASES[c][0], **CASES[c][1]) for c in CASES},
    "float16": lambda tmp: _retyped(tmp, torch.float16),
    "bfloat16": lambda tmp: _retyped(tmp, torch.bfloat16),
    "float64": lambda tmp: _retyped(tmp, torch.float64),
    "modules_to_save+unknown": _with_extras,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_header_inspect_equals_loaded_adapter_inspect(tmp_path, variant):
    """The numpy/header report equals the one built from the loaded Adapter (ranks, scales, dtypes, groups,
    unknown keys, serving warnings), with ‖ΔW‖ equal to float64 rounding."""
    path = VARIANTS[variant](tmp_path)
    assert is_peft_safetensors(path)
    fast = inspect_adapter(path)
    loaded = inspect_adapter(load_adapter(path, strict=False, ignore_modules_to_save=True))
    assert_close(fast, loaded)
    assert fast["modules"] > 0 and all(m["delta_norm"] > 0 for m in fast["per_module"])


@pytest.mark.parametrize("case", list(CASES))
def test_header_inspect_norms_equal_peft_merge(tmp_path, case):
    """‖ΔW‖ per module from the header path equals the norm of PEFT's own merge_and_unload() update."""
    model, kw = CASES[case]
    path = make_peft_adapter(tmp_path / case, model, **kw)
    expected = {n: float(torch.linalg.norm(d.double())) for n, d in peft_deltas(path, model).items()}
    got = {m["name"]: m["delta_norm"] for m in inspect_adapter(path)["per_module"]}
    assert set(got) == set(expected)
    for name, n in expected.items():
        assert math.isclose(got[name], n, rel_tol=1e-5), (name, got[name], n)
