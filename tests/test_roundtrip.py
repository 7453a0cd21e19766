"""read -> write -> PeftModel.from_pretrained gives the original adapter's logits."""

import json

import pytest
from helpers import make_peft_adapter, outputs, peft_model, rel
from test_peft_read import CASES

from mergekit_lora import load_adapter
from mergekit_lora.atomic import atomic_output
from mergekit_lora.formats.peft_write import write_peft


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_logits(tmp_path, case):
    model, kw = CASES[case]
    src = make_peft_adapter(tmp_path / "src", model, **kw)
    a = load_adapter(src)
    with atomic_output(tmp_path / "out") as tmp:
        cfg = write_peft(tmp, a.iter_units(), a.meta)
    assert cfg["use_rslora"] is False
    assert cfg["r"] == cfg["lora_alpha"]
    want = outputs(peft_model(src, model), model)
    got = outputs(peft_model(tmp_path / "out", model), model)
    assert rel(got, want) < 1e-5


def test_written_config_carries_metadata_and_patterns(tmp_path):
    model, kw = CASES["llama-patterns"]
    src = make_peft_adapter(tmp_path / "src", model, task_type="CAUSAL_LM", **kw)
    a = load_adapter(src)
    with atomic_output(tmp_path / "out") as tmp:
        write_peft(tmp, a.iter_units(), a.meta, target_modules=a.meta.target_modules)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert cfg["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 2
    assert cfg["alpha_pattern"]["model.layers.1.self_attn.v_proj"] == 6
    # the written adapter reads back with scale 1 everywhere and identical ΔW
    b = load_adapter(tmp_path / "out")
    for n in a.module_names():
        assert b.modules[n].scale == 1.0
        assert rel(b.units(n).delta(), a.units(n).delta()) < 1e-7


def test_same_inputs_give_identical_bytes(tmp_path):
    from mergekit_lora import merge

    a = make_peft_adapter(tmp_path / "a", "llama", r=4)
    b = make_peft_adapter(tmp_path / "b", "llama", r=2, seed=3)
    merge([a, b], "linear", tmp_path / "o1", weights=[0.3, 0.7])
    merge([a, b], "linear", tmp_path / "o2", weights=[0.3, 0.7])
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        assert (tmp_path / "o1" / name).read_bytes() == (tmp_path / "o2" / name).read_bytes(), name
