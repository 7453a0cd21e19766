"""Issue 28: the bad inputs that still broke — each one `error:` line, exit 2, no traceback, nothing written.

Recipe YAML with explicit tags, recipe options MergeOptions refuses (``seed: -1``), malformed ``-p`` values,
NaN parameters reported once, extreme but finite factors (every registered method), path components over
255 bytes, duplicate tensor names in a safetensors header, and an input rewritten in place with its mtime
restored (``--verify-inputs``).  Output-folder faults (PIDs, disk full, inodes, SIGTERM) are in
``test_reliability_faults.py``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from reliab_helpers import PEFT_W, assert_one_error, peft_tensors, required_params, snapshot, write_peft
from safetensors import safe_open
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.registry import available


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def two(tmp_path):
    return write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)


def recipe(tmp_path: Path, a: Path, b: Path, extra: str = "", source: str | None = None, out: str | None = None) -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(f"method: linear\nadapters:\n  - source: {source or a}\n  - source: {b}\n"
                 f"output: {{path: {out or tmp_path / 'merged'}}}\n{extra}")
    return r


# ---------------------------------------------------------------- recipe YAML: explicit tags, options
@pytest.mark.parametrize("value", ["!!int x", "!!bool x", "!!timestamp x", "!!float x", "!!int 1e999",
                                   "!!binary x", "!!python/object:os.system ls", "!!set {a}"])
def test_recipe_value_that_does_not_fit_its_tag(tmp_path, two, value):
    r = recipe(tmp_path, *two, f"seed: {value}\n")
    for extra in ((), ("--dry-run",)):
        assert_one_error(cli("run", r, *extra), ["r.yaml", "line 6"], out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_recipe_tag_error_inside_a_list_names_its_line(tmp_path, two):
    a, b = two
    r = tmp_path / "r.yaml"
    r.write_text(f"method: linear\nadapters:\n  - source: {a}\n    weight: [1, !!float abc]\n  - source: {b}\n"
                 f"output: {{path: {tmp_path / 'o'}}}\n")
    assert_one_error(cli("run", r), ["not valid YAML (line 4", "'abc' is not a valid !!float value"])


@pytest.mark.parametrize("extra, fragments", [
    ("seed: -1\n", ["seed (line 6)", "greater than or equal to 0", "(got -1)"]),
    ("verify_inputs: 3\n", ["verify_inputs (line 6)", "valid boolean"]),
])
def test_recipe_options_are_checked_like_the_cli(tmp_path, two, extra, fragments):
    assert_one_error(cli("run", recipe(tmp_path, *two, extra), "--dry-run"), ["r.yaml", *fragments])


# ---------------------------------------------------------------- -p key=VALUE
@pytest.mark.parametrize("item, fragments", [
    ("rank=[1", ["-p rank=[1: the value is not valid YAML (column 3)"]),
    ("rank=!!python/object:os.system ls", ["could not determine a constructor", "python/object:os.system"]),
    ("rank=!!int x", ["'x' is not a valid !!int value"]),
    ("rank={a: [", ["not valid YAML"]),
    ("rank=*x", ["aliases (*x) are not allowed"]),
    ("rank=\x00", ["not valid YAML"]),
])
def test_malformed_param_values(tmp_path, two, item, fragments):
    out = tmp_path / "merged"
    assert_one_error(cli("merge", *two, "--method", "svd", "-p", item, "-o", out), fragments, out=out)
    assert not out.exists()


def test_param_values_still_parse_as_yaml(tmp_path, two):
    from mergekit_lora.cli.common import parse_kv

    assert parse_kv(["rank=8", "x=[1, 2]", "y=true", "z=abc", "k-ratio=0.5"]) == {
        "rank": 8, "x": [1, 2], "y": True, "z": "abc", "k_ratio": 0.5}


# ---------------------------------------------------------------- NaN parameters: one problem
@pytest.mark.parametrize("args", [["merge", "--method", "ties", "--density", "nan"],
                                  ["merge", "--method", "ties", "--density", "inf"],
                                  ["cluster", "--k-ratio", "nan"],
                                  ["merge", "--method", "svd", "-p", "rank=.nan"]])
def test_nan_parameter_is_one_problem(tmp_path, two, args):
    out = tmp_path / "merged"
    flat = assert_one_error(cli(args[0], *two, *args[1:], "-o", out), ["is not a finite number"], out=out)
    assert "problems" not in flat and "less than or equal" not in flat, flat


def test_nan_parameter_from_python_is_one_problem(two):
    from mergekit_lora import LoraMergeError, MergeRequest, plan

    with pytest.raises(LoraMergeError) as e:
        plan(MergeRequest(sources=list(two), method="ties", params={"density": float("nan")}))
    assert str(e.value).count("is not a finite number") == 1 and "≤" not in str(e.value) and "less than" not in str(e.value)


# ---------------------------------------------------------------- extreme but finite factors, every method
METHODS = sorted(available())


@pytest.mark.parametrize("method", METHODS)
def test_extreme_factor_is_refused_by_every_method(tmp_path, method):
    t = peft_tensors(2)
    key = sorted(k for k in t if "lora_A" in k)[0]
    t[key][0, 0] = 2.6e36  # the value: finite, but its square overflows float32
    x, b = write_peft(tmp_path / "x", tensors=t), write_peft(tmp_path / "b", 1)
    before = snapshot(x, b)
    out = tmp_path / "merged"
    assert_one_error(cli("merge", x, b, "--method", method, *required_params(method), "-o", out),
                     [x / PEFT_W, key.removesuffix(".lora_A.weight").removeprefix("base_model.model."), "2.6e+36",
                      "lora_A", "overflow float32"], out=out)
    assert not out.exists() and snapshot(x, b) == before


@pytest.mark.parametrize("method", METHODS)
def test_large_but_safe_factors_merge_finite_with_every_method(tmp_path, method):
    t = peft_tensors(2)
    t[sorted(k for k in t if "lora_B" in k)[0]][0, 0] = 1e10  # × scale 2 × |A| ≤ 5 × rank 4 < 1e15
    x, b = write_peft(tmp_path / "x", tensors=t), write_peft(tmp_path / "b", 1)
    out = tmp_path / "merged"
    r = cli("merge", x, b, "--method", method, *required_params(method), "-o", out)
    assert r.exit_code == 0, r.output
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            assert all(bool(torch.isfinite(fh.get_tensor(k)).all()) for k in fh.keys() if "lora" in k)


def test_scale_overflowing_float32_is_refused(tmp_path):
    t = peft_tensors(2)
    t[sorted(k for k in t if "lora_B" in k)[0]][0, 0] = 3e38  # × alpha/r = 2: inf
    x, b = write_peft(tmp_path / "x", tensors=t), write_peft(tmp_path / "b", 1)
    for cmd in (["merge", "--method", "svd", "-p", "rank=2"], ["cluster"]):
        assert_one_error(cli(cmd[0], x, b, *cmd[1:], "-o", tmp_path / "m"), ["not finite once the scale"])


def test_routed_output_beyond_float16_is_refused(tmp_path):
    """Found by the long fuzz run: route wrote inf unit_B (float16 inputs, --weights 1e30,1)."""
    half = {k: v.half() for k, v in peft_tensors(0).items()}
    a = write_peft(tmp_path / "a", tensors=half)
    b = write_peft(tmp_path / "b", tensors={k: v.half() for k, v in peft_tensors(1).items()})
    out = tmp_path / "merged"
    assert_one_error(cli("merge", a, b, "--method", "route", "-p", "top_k=2", "--weights", "1e30,1", "--scale", "none",
                         "-o", out),
                     ["(B) has entries beyond the torch.float16 range"], out=out)
    assert not out.exists()


# ---------------------------------------------------------------- path components over 255 bytes
def test_long_path_components_are_one_sentence(tmp_path, two):
    a, b = two
    long = tmp_path / ("L" * 300)
    frag = ["300 bytes, over the 255"]
    assert_one_error(cli("inspect", long), frag)
    assert_one_error(cli("inspect", long / "adapter_model.safetensors"), frag)
    assert_one_error(cli("merge", long, b, "-o", tmp_path / "m"), frag, out=tmp_path / "m")
    assert_one_error(cli("merge", a, b, "-o", long), ["300 bytes"], out=tmp_path / "x")
    assert_one_error(cli("run", recipe(tmp_path, a, b, source="L" * 300)), ["adapters[0].source (line 3)", *frag])
    assert_one_error(cli("run", recipe(tmp_path, a, b, out=str(long))), ["output.path (line 5)", *frag])
    assert_one_error(cli("inspect", "x/" * 2100), ["over the 4095 a path may have"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "r.yaml"]


# ---------------------------------------------------------------- duplicate tensor names in a header
def test_duplicate_tensor_name_in_header_is_refused(tmp_path, two):
    a, b = two
    f = a / PEFT_W
    blob = f.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = blob[8:8 + n].decode().rstrip()
    first = sorted(k for k in json.loads(header) if k != "__metadata__")[0]
    entry = json.dumps(json.loads(header)[first])
    dup = header[:-1] + f', "{first}": {entry}}}'
    dup += " " * (-len(dup) % 8)
    f.write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + blob[8 + n:])
    for args in (["inspect", a], ["merge", a, b, "-o", tmp_path / "m"], ["cluster", a, b, "-o", tmp_path / "m"]):
        assert_one_error(cli(*args), [f, f"names '{first}' more than once"])
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- tampered input, mtime restored
def _tamper_after_plan(monkeypatch, victim: Path) -> None:
    import importlib

    plan_mod = importlib.import_module("mergekit_lora.pipeline.plan")
    real = plan_mod.check_compatible

    def plan_then_tamper(*args, **kw):
        result = real(*args, **kw)
        st = victim.stat()
        data = bytearray(victim.read_bytes())
        data[-4:] = struct.pack("<f", 7.0)  # same size, one value changed
        victim.write_bytes(bytes(data))
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time restored
        return result

    monkeypatch.setattr(plan_mod, "check_compatible", plan_then_tamper)


def test_rewritten_input_with_mtime_restored_is_refused_with_verify_inputs(tmp_path, two, monkeypatch):
    a, b = two
    _tamper_after_plan(monkeypatch, b / PEFT_W)
    out = tmp_path / "merged"
    assert_one_error(cli("merge", a, b, "--verify-inputs", "-o", out),
                     [b / PEFT_W, "changed after the merge was planned", "content fingerprint"], out=out)
    assert not out.exists()


def test_rewritten_kohya_file_is_refused_with_verify_inputs(tmp_path, monkeypatch):
    from reliab_helpers import kohya_tensors
    from safetensors.torch import save_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(kohya_tensors(0), str(a))
    save_file(kohya_tensors(1), str(b))
    _tamper_after_plan(monkeypatch, b)
    out = tmp_path / "merged"
    assert_one_error(cli("merge", a, b, "--verify-inputs", "-o", out), [b, "changed after the merge was planned"],
                     out=out)


def test_without_verify_inputs_such_a_rewrite_is_not_detected(tmp_path, two, monkeypatch):
    """The documented limit (docs/reliability.md): size + mtime cannot see it."""
    a, b = two
    _tamper_after_plan(monkeypatch, b / PEFT_W)
    assert cli("merge", a, b, "-o", tmp_path / "merged").exit_code == 0


def test_verify_inputs_gives_the_same_bytes(tmp_path, two):
    a, b = two
    for name, extra in (("plain", []), ("verified", ["--verify-inputs"])):
        assert cli("merge", a, b, "--method", "svd", "-p", "rank=2", *extra, "-o", tmp_path / name).exit_code == 0
    plain = tmp_path / "plain" / PEFT_W
    assert plain.read_bytes() == (tmp_path / "verified" / PEFT_W).read_bytes()
    r = cli("merge", a, b, "--verify-inputs", "--emit-recipe", "-", "-o", tmp_path / "again")
    assert r.exit_code == 0 and "verify_inputs: true" in r.output
