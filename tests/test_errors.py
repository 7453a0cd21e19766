"""Every refusal: one clear sentence naming the file and key, exit code 2, no traceback, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_peft_adapter
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError, load_adapter
from mergekit_lora.cli.main import app

W = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def edit_tensors(path: Path, fn) -> Path:
    sd = load_file(str(path / W))
    fn(sd)
    save_file(sd, str(path / W))
    return path


def edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def good(tmp_path):
    return make_peft_adapter(tmp_path / "good", "llama", r=4)


def _nan(sd):
    sd[Q_B][0, 0] = float("nan")


def _inf(sd):
    sd[Q_A][1, 2] = float("inf")


def _shape(sd):
    sd[Q_B] = torch.zeros(sd[Q_B].shape[0], 3)


def _drop_b(sd):
    del sd[Q_B]


def _dora(sd):
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)


def _lora_bias(sd):
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(32)


def _unknown(sd):
    sd["base_model.model.something.else"] = torch.ones(2)


TENSOR_CASES = {
    # name: (edit, expected fragments of the message)
    "nan": (_nan, [Q_B, "NaN or Inf"]),
    "inf": (_inf, [Q_A, "NaN or Inf"]),
    "shape-mismatch": (_shape, [Q_A, Q_B, "must be [out, 4]"]),
    "missing-half": (_drop_b, ["model.layers.0.self_attn.q_proj", "no lora_B half"]),
    "dora-key": (_dora, ["lora_magnitude_vector", "DoRA"]),
    "lora-bias-key": (_lora_bias, ["lora_B.bias", "trained LoRA bias"]),
    "unknown-key": (_unknown, ["base_model.model.something.else", "not PEFT LoRA weights"]),
}


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, fragments, out: Path | None = None):
    assert result.exit_code == 2, result.output
    text = result.output
    assert text.count("error:") == 1, text
    assert "Traceback" not in text
    flat = " ".join(text.split())
    for frag in fragments:
        assert frag in flat, (frag, text)
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensors_are_refused_with_file_and_key(tmp_path, good, case):
    edit, fragments = TENSOR_CASES[case]
    bad = edit_tensors(good, edit)
    out = tmp_path / "merged"
    result = run_cli("merge", bad, "--method", "linear", "-o", out)
    assert_user_error(result, [str(bad / W), *fragments], out)


CONFIG_CASES = {
    "use-dora": (dict(use_dora=True), ["use_dora", "DoRA"]),
    "lora-bias": (dict(lora_bias=True), ["lora_bias"]),
    "not-lora": (dict(peft_type="IA3"), ["peft_type is IA3"]),
    "rank-disagrees": (dict(r=6), ["model.layers.0.self_attn.q_proj", "rank 4", "r=6"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_configs_are_refused(tmp_path, good, case):
    changes, fragments = CONFIG_CASES[case]
    bad = edit_config(good, **changes)
    out = tmp_path / "merged"
    assert_user_error(run_cli("merge", bad, "-o", out), [str(bad.name), *fragments], out)


def test_trained_biases_are_refused(tmp_path):
    path = make_peft_adapter(tmp_path / "b", "gpt2", r=4, bias="all", target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(LoraMergeError, match=r"trains biases \(bias='all'.*\.bias"):
        load_adapter(path)


def test_modules_to_save_refused_unless_opted_in(tmp_path):
    path = make_peft_adapter(tmp_path / "m", "llama", r=4, modules_to_save=["lm_head"])
    out = tmp_path / "merged"
    assert_user_error(run_cli("merge", path, "-o", out), ["modules_to_save", "lm_head", "--ignore-modules-to-save"], out)
    result = run_cli("merge", path, "-o", out, "--ignore-modules-to-save")
    assert result.exit_code == 0, result.output
    assert load_adapter(path, ignore_modules_to_save=True).meta.extra["dropped_modules_to_save"]


def test_corrupt_safetensors(tmp_path, good):
    (good / W).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert_user_error(run_cli("inspect", good), [str(good / W), "not a readable safetensors file"])


def test_pickle_refused_unless_allowed(tmp_path, good):
    sd = load_file(str(good / W))
    (good / W).unlink()
    torch.save(sd, str(good / "adapter_model.bin"))
    out = tmp_path / "merged"
    assert_user_error(run_cli("merge", good, "-o", out), ["adapter_model.bin", "pickle", "--allow-pickle"], out)
    assert run_cli("merge", good, "-o", out, "--allow-pickle").exit_code == 0


def test_missing_source_and_unknown_format(tmp_path):
    assert_user_error(run_cli("inspect", tmp_path / "nope"), ["nope", "no such file or folder"])
    f = tmp_path / "x.safetensors"
    save_file({"model.weight": torch.ones(2, 2)}, str(f))
    assert_user_error(run_cli("inspect", f), [str(f), "not a recognised LoRA format", "model.weight"])


def test_inspect_lists_unknown_keys_instead_of_failing(good):
    edit_tensors(good, _unknown)
    result = run_cli("inspect", good, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["unknown_keys"] == ["base_model.model.something.else"]


def test_existing_output_needs_force_and_survives_failure(tmp_path, good):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(run_cli("merge", good, "-o", out), [str(out), "already exists", "--force"])
    assert (out / "keep.txt").read_text() == "mine"
    bad = edit_tensors(make_peft_adapter(tmp_path / "bad", "llama", r=4), _nan)
    result = run_cli("merge", good, bad, "-o", out, "--force")  # fails mid-stream
    assert result.exit_code == 2
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good", "merged"]


def test_real_process_exit_code_and_no_traceback(tmp_path, good):
    edit_tensors(good, _nan)
    # the real entry point in a real process (also where no `loramerge` script sits beside the interpreter)
    cmd = [sys.executable, "-m", "mergekit_lora.cli.main", "merge", str(good), "-o", str(tmp_path / "o")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.startswith("error:") and "Traceback" not in p.stderr + p.stdout
    assert Q_B in " ".join(p.stderr.split())
