"""Bad inputs (issue 14): every case is exit 2, one `error:` line naming the file/key/option, no traceback,
nothing written, inputs unchanged.  The bad files are built here, by hand."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from reliab_helpers import (
    PEFT_W,
    assert_one_error,
    diffusers_tensors,
    kohya_tensors,
    peft_config,
    peft_tensors,
    raw_safetensors,
    retype,
    snapshot,
    write_file,
    write_peft,
)
from typer.testing import CliRunner

from mergekit_lora.cli.main import app

QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
QB = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
KD = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
KU = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"
KA = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"
DB = "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def check_refused(tmp_path: Path, inputs: list[Path], fragments: list, extra: tuple = (), cmds=("inspect", "merge")):
    """Both commands refuse cleanly; nothing is written; the inputs are byte-identical afterwards."""
    before = snapshot(*inputs)
    out = tmp_path / "merged"
    for cmd in cmds:
        args = [cmd, *inputs] if cmd == "merge" else [cmd, inputs[0]]
        if cmd == "merge":
            args += ["--method", "linear", "-o", out, *extra]
        assert_one_error(cli(*args), fragments, out=out if cmd == "merge" else None)
        assert not out.exists()
    assert snapshot(*inputs) == before


# ---------------------------------------------------------------- factor dtypes and shapes
TENSOR_CASES = {
    # name: (key, dtype string, shape or None, fragments)
    "U32-lora_A": (QA, "U32", None, [QA, "dtype U32", "floating point"]),
    "I32-lora_B": (QB, "I32", None, [QB, "dtype I32", "floating point"]),
    "I64-lora_B": (QB, "I64", None, [QB, "dtype I64"]),
    "U8-lora_B": (QB, "U8", None, [QB, "dtype U8"]),
    "F8-lora_A": (QA, "F8_E4M3", None, [QA, "dtype F8_E4M3"]),
    "0d-lora_A": (QA, "F32", [], [QA, "shape []", "matrix"]),
    "1d-lora_A": (QA, "F32", [16], [QA, "shape [16]", "matrix"]),
    "1d-lora_B": (QB, "F32", [16], [QB, "shape [16]"]),
    "rank0-lora_A": (QA, "F32", [0, 16], [QA, "zero dimension"]),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_peft_factors(tmp_path, case):
    key, dtype, shape, fragments = TENSOR_CASES[case]
    bad = tmp_path / "bad"
    write_peft(bad)
    itemsize = 1 if dtype in ("U8", "F8_E4M3") else 8 if dtype == "I64" else 4
    raw_safetensors(bad / PEFT_W, retype(peft_tensors(), key, dtype, shape, itemsize))
    check_refused(tmp_path, [bad], [bad / PEFT_W, *fragments])


def test_rank0_pair_is_refused(tmp_path):
    t = peft_tensors()
    t[QA], t[QB] = torch.zeros(0, 16), torch.zeros(16, 0)
    bad = write_peft(tmp_path / "bad", tensors=t, config=peft_config(rank_pattern={"q_proj": 1}))
    check_refused(tmp_path, [bad], [QA, "zero dimension"])


SD_CASES = {
    "kohya-U32-down": ("kohya", KD, "U32", None, [KD, "dtype U32"]),
    "kohya-I16-up": ("kohya", KU, "I16", None, [KU, "dtype I16"]),
    "kohya-1d-down": ("kohya", KD, "F32", [64], [KD, "matrix"]),
    "kohya-rank0": ("kohya", KD, "F32", [0, 16], [KD, "zero dimension"]),
    "kohya-alpha-empty": ("kohya", KA, "F32", [0], [KA, "alpha must be one number"]),
    "kohya-alpha-U32": ("kohya", KA, "U32", [], [KA, "alpha must be a number"]),
    "kohya-alpha-F8_E8M0": ("kohya", KA, "F8_E8M0", [], [KA, "dtype F8_E8M0", "alpha must be a number"]),
    "diffusers-I32-B": ("diffusers", DB, "I32", None, [DB, "dtype I32"]),
    "diffusers-0d-B": ("diffusers", DB, "F32", [], [DB, "matrix"]),
}


@pytest.mark.parametrize("case", list(SD_CASES))
def test_bad_sd_factors(tmp_path, case):
    fmt, key, dtype, shape, fragments = SD_CASES[case]
    tensors = kohya_tensors() if fmt == "kohya" else diffusers_tensors()
    bad = raw_safetensors(tmp_path / f"{fmt}.safetensors", retype(tensors, key, dtype, shape,
                                                                            {"I16": 2, "F8_E8M0": 1}.get(dtype, 4)))
    check_refused(tmp_path, [bad], [bad, *fragments])


def test_kohya_alpha_inf(tmp_path):
    t = kohya_tensors()
    t[KA] = torch.tensor(float("inf"))
    bad = write_file(tmp_path / "k.safetensors", t)
    check_refused(tmp_path, [bad], [bad, KA, "NaN or Inf"])


def test_diffusers_metadata_alpha_of_wrong_type(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "d.safetensors"
    save_file(diffusers_tensors(), str(bad),
              metadata={"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "eight"})})
    check_refused(tmp_path, [bad], [bad, "lora_adapter_metadata", "unet.lora_alpha"])


# ---------------------------------------------------------------- adapter_config.json
CONFIG_CASES = {
    "r-string": ({"r": "eight"}, ["'r' must be a positive integer", "'eight'"]),
    "r-bool": ({"r": True}, ["'r' must be a positive integer"]),
    "r-zero": ({"r": 0}, ["'r' must be a positive integer"]),
    "alpha-string": ({"lora_alpha": "sixteen"}, ["'lora_alpha' must be a finite number", "'sixteen'"]),
    "base-model-int": ({"base_model_name_or_path": 123}, ["'base_model_name_or_path' must be a string", "123"]),
    "rank-pattern-list": ({"rank_pattern": ["q_proj"]}, ["'rank_pattern' must map module regexes"]),
    "rank-pattern-regex": ({"rank_pattern": {"q_proj(": 4}}, ["'rank_pattern' has a key 'q_proj('",
                                                             "not a valid regular expression"]),
    "rank-pattern-zero": ({"rank_pattern": {"q_proj": 0}}, ["'rank_pattern'", "positive integer"]),
    "alpha-pattern-type": ({"alpha_pattern": 3}, ["'alpha_pattern' must map module regexes to finite numbers"]),
    "alpha-pattern-value": ({"alpha_pattern": {"q_proj": "x"}}, ["'alpha_pattern'"]),
    "rslora-string": ({"use_rslora": "yes"}, ["'use_rslora' must be true or false"]),
    "targets-int": ({"target_modules": 5}, ["'target_modules'"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_adapter_config(tmp_path, case):
    changes, fragments = CONFIG_CASES[case]
    bad = write_peft(tmp_path / "bad", config=peft_config(**changes))
    check_refused(tmp_path, [bad], [bad / "adapter_config.json", *fragments])


@pytest.mark.parametrize("text", [b"\xff\xfe{", b"[1, 2]", b"{" * 100_000, b'{"r": 1e999}'])
def test_unreadable_adapter_config(tmp_path, text):
    bad = write_peft(tmp_path / "bad")
    (bad / "adapter_config.json").write_bytes(text)
    check_refused(tmp_path, [bad], [bad / "adapter_config.json"])


# ---------------------------------------------------------------- files changing under the reader
def test_file_truncated_below_8_bytes_after_the_header_check(tmp_path):
    from mergekit_lora import LoraMergeError
    from mergekit_lora.formats.tensors import TensorSource

    f = write_file(tmp_path / "k.safetensors", kohya_tensors())
    src = TensorSource.open(f)
    f.write_bytes(b"\x01\x02\x03")
    with pytest.raises(LoraMergeError, match="k.safetensors: the file changed after its header was read"):
        src.get(KD)
    src._stat = None  # even without the size/mtime record: the short read is one clear error
    with pytest.raises(LoraMergeError, match=rf"k.safetensors: cannot read tensor {KD}"):
        src.get(KD)


def test_input_modified_in_place_during_a_run_is_refused(tmp_path, monkeypatch):
    """Same size, zeroed data, written after the plan read the headers: refused, nothing written."""
    import importlib

    merge_mod = importlib.import_module("mergekit_lora.pipeline.plan")

    a, b = write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)
    real = merge_mod.check_compatible

    def plan_then_tamper(*args, **kw):
        plan = real(*args, **kw)
        w = b / PEFT_W
        data = w.read_bytes()
        w.write_bytes(data[:-64] + bytes(64))  # same size, the last values zeroed
        return plan

    monkeypatch.setattr(merge_mod, "check_compatible", plan_then_tamper)
    out = tmp_path / "merged"
    assert_one_error(cli("merge", a, b, "-o", out), [b / PEFT_W, "changed after its header was read"], out=out)
    assert not out.exists()


# ---------------------------------------------------------------- pickles
class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_one_sentence(tmp_path, capfd):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(peft_config()))
    with open(bad / "adapter_model.bin", "wb") as fh:
        pickle.dump({"x": _Evil()}, fh)
    out = tmp_path / "merged"
    result = cli("merge", bad, "-o", out, "--allow-pickle")
    text = assert_one_error(result, [bad / "adapter_model.bin", "plain dict of tensors", "refused"], out=out)
    assert "weights_only" not in text and "pwned" not in text
    assert len(result.output.strip().splitlines()) <= 2  # one sentence (soft-wrapped at most once)
    captured = capfd.readouterr()
    assert "pwned" not in captured.out + captured.err and "weights_only" not in captured.err


# ---------------------------------------------------------------- options and output paths
@pytest.fixture
def two(tmp_path):
    return write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)


OPTION_CASES = {
    "weights-nan": (["--weights", "nan,1"], ["weights[0] is not a finite number"]),
    "weights-inf": (["--weights", "1,inf"], ["weights[1] is not a finite number"]),
    "weights-neg-inf": (["--weights", "-inf,1"], ["weights[0] is not a finite number"]),
    "ties-lambda-nan": (["--method", "ties", "--density", "0.5", "-p", "lambda=.nan"], ["parameters.lambda"]),
    "ties-density-nan": (["--method", "ties", "--density", "nan"], ["density"]),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_non_finite_options(tmp_path, two, case):
    args, fragments = OPTION_CASES[case]
    before = snapshot(*two)
    out = tmp_path / "merged"
    assert_one_error(cli("merge", *two, "-o", out, *args), fragments, out=out)
    assert not out.exists() and snapshot(*two) == before


def test_recipe_parameters_and_gradients_must_be_finite(tmp_path, two):
    for body, frag in [("parameters: {density: .nan}", "density"),
                       ("modules: [{match: '*q_proj*', weights: [.inf, 1]}]", "modules[0].weights")]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"method: ties\nadapters:\n  - {{source: {two[0]}, weight: 1}}\n"
                          f"  - {{source: {two[1]}, weight: [1, .nan]}}\n{body}\noutput: {{path: {tmp_path / 'o'}}}\n")
        assert_one_error(cli("run", recipe), [frag], out=tmp_path / "o")
        assert not (tmp_path / "o").exists()


def _out_cases(tmp_path: Path, a: Path) -> dict[str, tuple[str, list[str]]]:
    (tmp_path / "afile").write_text("x")
    return {
        "is-input": (str(a), ["'" + str(a) + "' is the input"]),
        "inside-input": (str(a / "sub"), ["is inside the input"]),
        "parent-of-input": (str(tmp_path), ["contains the input"]),
        "dot": (".", ["'.' is the current folder"]),
        "empty": ("", ["current folder"]),
        "parent-is-file": (str(tmp_path / "afile" / "out"), ["afile is a file, not a folder"]),
        "name-300": (str(tmp_path / ("n" * 300)), ["longer than the 255 this filesystem allows"]),
    }


@pytest.mark.parametrize("case", ["is-input", "inside-input", "parent-of-input", "dot", "empty", "parent-is-file",
                                  "name-300"])
def test_bad_output_paths(tmp_path, two, case, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out, fragments = _out_cases(tmp_path, two[0])[case]
    before = snapshot(*two)
    assert_one_error(cli("merge", *two, "-o", out, "--force"), ["output path", *fragments])
    assert snapshot(*two) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "afile", "b", "cwd"]
    assert list((tmp_path / "cwd").iterdir()) == []


def test_recipe_whose_output_is_an_input(tmp_path, two):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nadapters:\n  - {{source: {two[0]}}}\n  - {{source: {two[1]}}}\n"
                      f"output: {{path: {two[1]}}}\n")
    before = snapshot(*two)
    assert_one_error(cli("run", recipe, "--force"), ["is the input"])
    assert snapshot(*two) == before


def test_read_only_output_parent(tmp_path, two, monkeypatch):
    import os

    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    assert_one_error(cli("merge", *two, "-o", ro / "out"), ["output path", f"the folder {ro} is not writable"])
    assert list(ro.iterdir()) == []
