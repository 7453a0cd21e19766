"""`loramerge merge` / `loramerge methods`: a real merge end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from helpers import make_peft_adapter, outputs, peft_model, rel
from typer.testing import CliRunner

from mergekit_lora import load_adapter
from mergekit_lora.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return [str(make_peft_adapter(root / f"a{i}", seed=31 + i)) for i in range(2)]


def test_merge_ties_writes_a_loadable_adapter_with_card(inputs, tmp_path):
    out = tmp_path / "ties"
    r = runner.invoke(app, ["merge", *inputs, "--method", "ties", "--density", "0.5", "--lambda", "0.9",
                            "--weights", "1,0.5", "--rank", "3", "--seed", "5", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "refactor rel. error" in r.output and "wrote" in r.output
    card = (out / "README.md").read_text()
    assert "- ties" in card and "library_name: peft" in card and "- lambda: `0.9`" in card
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    merged = load_adapter(out)
    assert all(merged.modules[n].rank == 3 for n in merged.module_names())
    assert outputs(peft_model(out), "llama").isfinite().all()
    # again with --force: same bytes (seeded)
    before = (out / "adapter_model.safetensors").read_bytes()
    r2 = runner.invoke(app, ["merge", *inputs, "-m", "ties", "--density", "0.5", "--lambda", "0.9",
                             "--weights", "1,0.5", "--rank", "3", "--seed", "5", "--device", "cpu", "-o", str(out),
                             "--force"])
    assert r2.exit_code == 0, r2.output
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_merge_svd_default_rank_and_param_flag(inputs, tmp_path):
    out = tmp_path / "svd"
    r = runner.invoke(app, ["merge", *inputs, "-m", "svd", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # max input rank
    out2 = tmp_path / "dare"
    r = runner.invoke(app, ["merge", *inputs, "-m", "dare_ties", "-p", "density=0.7", "-p", "lambda=1.5",
                            "-p", "majority_sign=frequency", "-o", str(out2), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "- majority_sign: `frequency`" in (out2 / "README.md").read_text()


def test_single_input_linear_reproduces_it(inputs, tmp_path):
    out = tmp_path / "one"
    r = runner.invoke(app, ["merge", inputs[0], "-m", "linear", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert rel(outputs(peft_model(out), "llama"), outputs(peft_model(inputs[0]), "llama")) < 1e-5


BAD = {
    "unknown method": (["-m", "nope"], "unknown method"),
    "wrong weight count": (["-m", "linear", "--weights", "1,2,3"], "3 weights for 2 adapters"),
    "density zero": (["-m", "ties", "--density", "0"], "density"),
    "density above one": (["-m", "dare_linear", "--density", "1.5"], "density"),
    "density nan": (["-m", "magnitude_prune", "--density", "nan"], "density"),
    "rank zero": (["-m", "svd", "--rank", "0"], "rank"),
    "rank on cat": (["-m", "cat", "--rank", "2"], "does not take --rank"),
    "bad sign method": (["-m", "ties", "--density", "0.5", "-p", "majority_sign=vote"], "majority_sign"),
    "cuda without cuda": (["-m", "linear", "--device", "cuda"], None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(inputs, tmp_path, case):
    import torch

    args, needle = BAD[case]
    if case == "cuda without cuda":
        if torch.cuda.is_available():
            pytest.skip("CUDA present")
        needle = "CUDA is not available"
    out = tmp_path / "out"
    r = runner.invoke(app, ["merge", *inputs, *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    text = r.stderr.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    assert needle in text, text
    assert "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_methods_lists_every_static_method_with_parameters():
    r = runner.invoke(app, ["methods", "--json"])
    assert r.exit_code == 0
    by_name = {d["name"]: d for d in json.loads(r.stdout)}
    assert {"linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"} <= set(by_name)
    ties = by_name["ties"]["parameters"]
    assert ties["density"]["default"] == 0.5 and ties["lambda"]["default"] == 1.0  # chosen on the suite
    assert by_name["ties"]["default_scale"] == "2*average" and by_name["linear"]["default_scale"] == "none"
    assert ties["majority_sign"]["default"] == "total"
    assert all(by_name[m]["description"] for m in by_name)
    r = runner.invoke(app, ["methods"])
    assert r.exit_code == 0 and "magnitude_prune" in r.stdout
