"""Fuzzing as a test (issue 14): mutated PEFT / kohya / diffusers files never crash the CLI.

Each example takes a valid adapter, mutates it (byte flips, truncation, header JSON edits: dtypes,
shapes, offsets, keys, metadata; adapter_config.json values; odd tensor dtypes and shapes), then runs
``loramerge inspect`` and ``loramerge merge`` (with a valid adapter of the same format).  Each run must
either succeed with finite output tensors or end with one `error:` line and exit 2 (LoraMergeError):
never another exception, never more than 10 s (hypothesis' deadline).

A fixed seed (``derandomize``) and 300 examples by default; ``pytest --fuzz-long tests/test_fuzz.py``
runs 10,000 (``LORAMERGE_FUZZ_EXAMPLES=N`` any count, ``LORAMERGE_FUZZ_SEED=N`` another sequence).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from reliab_helpers import PEFT_W, diffusers_tensors, kohya_tensors, peft_config, peft_tensors, write_peft
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lora.cli.main import app

DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "U32", "U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "F8_E8M0", "F4", "C64",
          "XYZ", ""]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "base_model_name_or_path",
               "fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "bias", "peft_type", "modules_to_save",
               "revision", "task_type"]


def split(blob: bytes) -> tuple[dict, bytes] | None:
    if len(blob) < 8:
        return None
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        return json.loads(blob[8:8 + n]), blob[8 + n:]
    except (ValueError, UnicodeDecodeError):
        return None


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def header_edit(draw, header: dict) -> dict:
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return header
    key = draw(st.sampled_from(keys))
    entry = dict(header[key]) if isinstance(header[key], dict) else {}
    what = draw(st.sampled_from(["dtype", "shape", "offsets", "delete", "rename", "metadata", "entry"]))
    if what == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif what == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 40), max_size=4))
    elif what == "offsets":
        a = draw(st.integers(0, 5000))
        entry["data_offsets"] = [a, a + draw(st.integers(-8, 2000))]
    elif what == "delete":
        return {k: v for k, v in header.items() if k != key}
    elif what == "rename":
        new = draw(st.sampled_from([key.replace("lora_A", "lora_B"), key.replace("down", "up"), key + ".x",
                                    key.replace("weight", "bias"), "alpha", key.replace(".weight", ".alpha")]))
        return {(new if k == key else k): v for k, v in header.items()}
    elif what == "metadata":
        return {**header, "__metadata__": draw(st.dictionaries(
            st.sampled_from(["lora_adapter_metadata", "ss_network_alpha", "format", "x"]),
            st.text(max_size=30) | JSON_VALUES.map(json.dumps), max_size=2))}
    else:
        entry = draw(JSON_VALUES)
    return {**header, key: entry}


@st.composite
def mutation(draw):
    """(kind, how to mutate): applied to a fresh valid adapter by :func:`apply`."""
    kind = draw(st.sampled_from(["peft", "kohya", "diffusers"]))
    how = draw(st.sampled_from(["flip", "truncate", "header", "header2", "config", "tensor"]
                               if kind == "peft" else ["flip", "truncate", "header", "header2", "tensor"]))
    data = draw(st.data())
    return kind, how, data


def valid(kind: str, folder: Path, seed: int) -> tuple[Path, Path]:
    """(the source to pass, the weights file inside it)."""
    if kind == "peft":
        p = write_peft(folder / f"peft{seed}", seed)
        return p, p / PEFT_W
    tensors = kohya_tensors(seed) if kind == "kohya" else diffusers_tensors(seed)
    f = folder / f"{kind}{seed}.safetensors"
    save_file(tensors, str(f))
    return f, f


def apply(kind: str, how: str, data, source: Path, weights: Path) -> None:
    blob = weights.read_bytes()
    if how == "flip":
        b = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] ^= data.draw(st.integers(1, 255))
        weights.write_bytes(bytes(b))
    elif how == "truncate":
        weights.write_bytes(blob[:data.draw(st.integers(0, len(blob) - 1))])
    elif how in ("header", "header2"):
        header, rest = split(blob)
        for _ in range(1 if how == "header" else 3):
            header = data.draw(header_edit(header))
        weights.write_bytes(join(header, rest))
    elif how == "config":
        cfg = peft_config()
        for _ in range(data.draw(st.integers(1, 3))):
            cfg[data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(JSON_VALUES)
        (source / "adapter_config.json").write_text(json.dumps(cfg))  # NaN/Infinity literals included
    else:  # odd tensor dtypes and shapes written by safetensors itself
        tensors = {"peft": peft_tensors, "kohya": kohya_tensors, "diffusers": diffusers_tensors}[kind](0)
        key = data.draw(st.sampled_from(sorted(tensors)))
        shape = data.draw(st.lists(st.integers(0, 20), max_size=4))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                           torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn]))
        fill = data.draw(st.sampled_from([0.0, 1.0, -3.5, 1e30, float("inf"), float("nan")]))
        tensors[key] = torch.full(shape, fill).to(dtype) if dtype != torch.bool else torch.ones(shape, dtype=dtype)
        save_file(tensors, str(weights))


def _count(what: str, code: int) -> None:
    """``LORAMERGE_FUZZ_COUNT_FILE=path``: one line per CLI run (test, command, exit code), for the counts
    in docs/reliability.md (appended as it goes, so a run cut short still counts what it did)."""
    path = os.environ.get("LORAMERGE_FUZZ_COUNT_FILE")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test} {what.split()[0] if what.split() else '?'} {code}\n")


def assert_clean(result, what: str) -> None:
    _count(what, result.exit_code)
    if result.exit_code == 0:
        return
    exc = result.exception
    assert result.exit_code == 2 and (exc is None or isinstance(exc, SystemExit)), (
        f"{what}: exit {result.exit_code}, {type(exc).__name__}: {exc}\n{result.output[-2000:]}")
    assert result.output.count("error:") == 1 and "Traceback" not in result.output, result.output


def finite_output(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                if t.is_floating_point():
                    assert bool(torch.isfinite(t).all()), (f, k)


def fuzz_settings(request_examples: int):
    # LORAMERGE_FUZZ_SEED=N explores another sequence (reproducible with the same N); default: derandomized
    return settings(max_examples=request_examples, deadline=10_000, database=None,
                    derandomize="LORAMERGE_FUZZ_SEED" not in os.environ,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture], print_blob=True)


def _examples() -> int:
    return int(os.environ.get("LORAMERGE_FUZZ_EXAMPLES", "300"))


@seed(int(os.environ.get("LORAMERGE_FUZZ_SEED", "0")))
@fuzz_settings(_examples())
@given(m=mutation(), method=st.sampled_from([["linear"], ["cat"], ["ties", "--density", "0.5"], ["svd", "-p", "rank=2"]]))
def test_mutated_adapters_never_crash(m, method):
    kind, how, data = m
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        good, _ = valid(kind, folder, 1)
        source, weights = valid(kind, folder, 0)
        apply(kind, how, data, source, weights)
        assert_clean(runner.invoke(app, ["inspect", str(source)]), "inspect")
        out = folder / "merged"
        result = runner.invoke(app, ["merge", str(source), str(good), "--method", method[0], *method[1:],
                                     "-o", str(out)])
        assert_clean(result, f"merge {method[0]}")
        if result.exit_code == 0:
            finite_output(out)
        else:
            assert not out.exists()
        assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

