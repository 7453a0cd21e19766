"""Fuzzing the modes that found issue 28's bugs: merges on extreme finite numbers and odd shapes/dtypes (every
registered method), recipe YAML (tags, anchors, aliases, types, lengths), ``-p key=VALUE`` values, and path
names (lengths, characters).

Each case must end with exit 0 and finite output, or exit 2 with one `error:` line, no traceback and nothing
written (no output folder, no temp debris).  A fixed seed (derandomized); a few seconds by default in CI.
``pytest --fuzz-long`` (or ``LORAMERGE_FUZZ_LONG=1``) runs 15,300 cases here (with tests/test_fuzz.py's
10,000: 25,300); ``LORAMERGE_FUZZ_SEED=N`` explores another sequence.  Counts: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import os
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, seed
from hypothesis import strategies as st
from reliab_helpers import debris, peft_config, required_params, write_peft
from test_fuzz import assert_clean, finite_output, fuzz_settings
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.registry import available

LONG = os.environ.get("LORAMERGE_FUZZ_LONG", "") not in ("", "0")
SEED = int(os.environ.get("LORAMERGE_FUZZ_SEED", "0"))


def examples(ci: int, long: int) -> int:
    return long if LONG else ci


METHODS = sorted(available())
REQUIRED = {m: required_params(m) for m in METHODS}


@contextlib.contextmanager
def two_inputs() -> Iterator[tuple[CliRunner, Path, Path, Path, Path]]:
    """(runner, folder, adapter a, adapter b, the output path) in a fresh temp folder."""
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        yield CliRunner(), folder, write_peft(folder / "a", 0), write_peft(folder / "b", 1), folder / "merged"


def check(result, out: Path | None, what: str) -> None:
    """The issue's contract: exit 0 with finite output, or one clean error and nothing written."""
    assert_clean(result, what)
    if out is None:
        return
    if result.exit_code == 0:
        finite_output(out)
    else:
        assert not out.exists(), (what, result.output)
    assert debris(out.parent) == [], debris(out.parent)


# ---------------------------------------------------------------- merges on extreme finite numbers
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def factor(draw, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    how = draw(st.sampled_from(["plain", "scaled", "spike", "zeros", "tiny", "mixed"]))
    big = float(torch.finfo(dtype).max)
    if how == "scaled":
        t = t * 10.0 ** draw(st.integers(-45, 38))
    elif how == "spike":
        t[draw(st.integers(0, shape[0] - 1)), draw(st.integers(0, shape[1] - 1))] = \
            draw(st.sampled_from([1.0, -1.0])) * draw(st.sampled_from([1e6, 1e14, 1e15, 2e15, 2.6e36, 3e38, big]))
    elif how == "zeros":
        t = torch.zeros(shape, dtype=torch.float64)
    elif how == "tiny":
        t = t * 1e-40
    elif how == "mixed":
        t = t * torch.logspace(-30, 30, shape[1], dtype=torch.float64)
    t = t.clamp(-big, big).to(dtype)
    return t


@st.composite
def extreme_adapter(draw, folder: Path, name: str) -> Path:
    r, d_in, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from(DTYPES))
    tensors = {}
    for mod in ("q", "v"):
        key = f"base_model.model.model.layers.0.self_attn.{mod}_proj"
        tensors[f"{key}.lora_A.weight"] = draw(factor((r, d_in), dtype))
        tensors[f"{key}.lora_B.weight"] = draw(factor((d_out, r), dtype))
    alpha = draw(st.sampled_from([r, 2 * r, 1e-30, 1e30, 3e38]))
    return write_peft(folder / name, r=r, tensors=tensors, config=peft_config(r, lora_alpha=alpha))


@seed(SEED)
@fuzz_settings(examples(10, 1000))
@given(data=st.data(), method=st.sampled_from(METHODS + ["cluster"]))
def test_fuzz_merge_extreme_values(data, method):
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        a = data.draw(extreme_adapter(folder, "a"))
        b = data.draw(extreme_adapter(folder, "b")) if data.draw(st.booleans()) else write_peft(folder / "b", 1)
        check(runner.invoke(app, ["inspect", str(a)]), None, "inspect")
        out = folder / "merged"
        cmd = ["cluster"] if method == "cluster" else ["merge", "--method", method, *REQUIRED[method]]
        extra = data.draw(st.sampled_from([[], ["--dtype", "float16"], ["--weights", "1e30,1"], ["--verify-inputs"]]))
        check(runner.invoke(app, [cmd[0], str(a), str(b), *cmd[1:], *extra, "-o", str(out)]), out, method)


# ---------------------------------------------------------------- recipe YAML
TAGS = ["!!int", "!!float", "!!bool", "!!str", "!!null", "!!timestamp", "!!binary", "!!set", "!!omap", "!!pairs",
        "!!seq", "!!map", "!!merge", "!!python/object:os.system", "!!python/name:os.getcwd", "!custom", "!<tag:x>"]
TOKENS = ["0", "-1", "1", "0.5", "1e999", "-1e999", ".nan", ".inf", "99999999999999999999999", "0x1F", "0o17",
          "1_000", "true", "no", "null", "~", "x", "''", '""', "[]", "{}", "[1, 2]", "{a: 1}", "2001-12-14",
          "linear", "svd", "ties", "lego", "cat", "union", "cpu", "cuda", "float16", "peft", "!", "|", ">", "- x",
          "&a 1", "*a", "<<: {}", "? x", "%YAML 1.2", "---", "...", "\t", "'unterminated", "[1,", "{a:"]


@st.composite
def yaml_value(draw, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["token", "tag", "anchor", "alias", "list", "map", "long", "text", "number"]))
    if kind == "token" or (depth > 2 and kind in ("list", "map")):
        return draw(st.sampled_from(TOKENS))
    if kind == "tag":
        return f"{draw(st.sampled_from(TAGS))} {draw(st.sampled_from(TOKENS))}"
    if kind == "anchor":
        return f"&{draw(st.sampled_from(['a', 'b', 'x']))} {draw(yaml_value(depth + 1))}"
    if kind == "alias":
        return f"*{draw(st.sampled_from(['a', 'b', 'x']))}"
    if kind == "list":
        return "[" + ", ".join(draw(st.lists(yaml_value(depth + 1), max_size=4))) + "]"
    if kind == "map":
        keys = draw(st.lists(st.sampled_from(["rank", "density", "k", "seed", "x", "weight", "source"]), max_size=3))
        return "{" + ", ".join(f"{k}: {draw(yaml_value(depth + 1))}" for k in keys) + "}"
    if kind == "long":
        return "'" + draw(st.sampled_from(["a", "/", "é", "x/"])) * draw(st.integers(200, 5000)) + "'"
    if kind == "number":
        return repr(draw(st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True))))
    return draw(st.text(alphabet=string.printable + "é\u2028\x00\x85", max_size=40))


KEYS = ["method", "base_model", "parameters", "modules", "seed", "missing", "device", "allow_pickle",
        "ignore_modules_to_save", "verify_inputs", "unknown"]


@st.composite
def recipe_text(draw, a: Path, b: Path, out: Path) -> str:
    method = draw(st.sampled_from(["linear", "svd", "ties", "lego", "cat"])) if draw(st.booleans()) else \
        draw(yaml_value())
    lines = [f"method: {method}", "adapters:", f"  - source: {a}"]
    if draw(st.booleans()):
        lines.append(f"    weight: {draw(yaml_value())}")
    lines += [f"  - source: {draw(yaml_value()) if draw(st.integers(0, 5)) == 0 else b}",
              f"output: {{path: {out}{', dtype: ' + draw(yaml_value()) if draw(st.booleans()) else ''}}}"]
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"{draw(st.sampled_from(KEYS))}: {draw(yaml_value())}")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 3)) == 0:  # raw character edits too
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.text(alphabet=string.printable + "é&*!%@`", max_size=6)) + text[i:]
    return text


@seed(SEED)
@fuzz_settings(examples(60, 8000))
@given(data=st.data(), dry=st.booleans())
def test_fuzz_recipe_yaml(data, dry):
    with two_inputs() as (runner, folder, a, b, out):
        r = folder / "r.yaml"
        r.write_text(data.draw(recipe_text(a, b, out)), encoding="utf-8", errors="surrogatepass")
        result = runner.invoke(app, ["run", str(r), *(["--dry-run"] if dry else [])])
        check(result, out if not dry else None, "run")
        if dry:
            assert not out.exists()


# ---------------------------------------------------------------- -p key=VALUE
PARAM_KEYS = ["rank", "density", "k", "k_ratio", "lambda", "majority_sign", "seed", "n_init", "x", "", "-", "a-b"]


@seed(SEED)
@fuzz_settings(examples(40, 6000))
@given(key=st.sampled_from(PARAM_KEYS),
       value=st.one_of(yaml_value(), st.text(max_size=30), st.sampled_from(TOKENS)),
       method=st.sampled_from(["svd", "ties", "linear", "dare_linear", "lego"]))
def test_fuzz_param_values(key, value, method):
    with two_inputs() as (runner, _, a, b, out):
        result = runner.invoke(app, ["merge", str(a), str(b), "--method", method, *REQUIRED[method],
                                     "-p", f"{key}={value}", "-o", str(out)])
        check(result, out, f"-p {key}={value!r}")


# ---------------------------------------------------------------- path names
NAME_CHARS = string.ascii_letters + string.digits + " -_.,;:'\"%$#@!~`=+()[]{}\\\t\né漢\U0001f600\u202e"


def safe_name(name: str) -> str:
    """A relative name below the test folder: no absolute paths, no ``..`` (the fuzz must not write outside)."""
    parts = [p for p in name.replace("\x00", "").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "x"


@seed(SEED)
@fuzz_settings(examples(12, 300))
@given(name=st.one_of(st.text(alphabet=NAME_CHARS + "/", min_size=1, max_size=40),
                      st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "漢", "ab/"]), st.integers(100, 1500))),
       role=st.sampled_from(["input", "output", "both"]), create=st.booleans())
def test_fuzz_path_names(name, role, create):
    runner = CliRunner()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        path = folder / "in" / safe_name(name)
        good = write_peft(folder / "good", 0)
        source = good
        if role in ("input", "both"):
            source = path
            if create:
                try:
                    write_peft(path, 1)
                except OSError:  # the name cannot exist: the CLI must still say so in one line
                    pass
            check(runner.invoke(app, ["inspect", str(source)]), None, "inspect")
        out = (folder / "out" / safe_name(name)) if role in ("output", "both") else folder / "merged"
        if out.parent != folder:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass
        result = runner.invoke(app, ["merge", str(source), str(good), "-o", str(out)])
        assert_clean(result, "merge")
        if result.exit_code != 0 and out.parent.is_dir():
            assert debris(out.parent) == []


def test_long_mode_counts_at_least_20000_cases():
    """The long mode's total across inspect/merge (test_fuzz.py), merges on extreme values, recipes, -p, paths."""
    from test_fuzz import _examples

    if not LONG:
        pytest.skip("LORAMERGE_FUZZ_LONG=1 / --fuzz-long")
    assert _examples() + 1000 + 8000 + 6000 + 300 >= 20_000
