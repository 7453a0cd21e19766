"""The portable PEFT profile: one rank, lora_alpha = r, no patterns; PEFT loads it with identical logits."""

import json

import pytest
import torch
from helpers import MODELS, make_peft_adapter, outputs, peft_model, rel
from safetensors import safe_open

from mergekit_lora import load_adapter
from mergekit_lora.atomic import atomic_output
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.formats.peft_write import write_peft
from mergekit_lora.formats.portable import REFUSED_KEYS, serving_warnings

CASES = {
    # mixed ranks and alphas, rsLoRA: everything the engines refuse
    "patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
                     alpha_pattern={"v_proj": 3}),
    # only layer 0: short target_modules also select layer 1, whose B stays zero in PEFT
    "one-layer": dict(r=3, lora_alpha=6, target_modules=["q_proj", "o_proj"], layers_to_transform=[0]),
}


def _write(tmp_path, src, **kw):
    a = load_adapter(src)
    with atomic_output(tmp_path / "out") as tmp:
        cfg = write_peft(tmp, a.iter_units(), a.meta, profile="portable", **kw)
    return a, cfg, json.loads((tmp_path / "out" / "adapter_config.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_portable_loads_in_peft_with_identical_logits(tmp_path, case):
    src = make_peft_adapter(tmp_path / "src", "llama", **CASES[case])
    a, cfg, written = _write(tmp_path, src, dtype=torch.float32)
    assert not set(REFUSED_KEYS) & set(written), "refused keys written"
    ranks = [i.rank for i in a.modules.values()]
    top = max(ranks)
    assert written["r"] == written["lora_alpha"] == top
    assert isinstance(written["target_modules"], list)
    assert written["target_modules"] == sorted(CASES[case]["target_modules"])
    added = sum((top - i.rank) * (i.d_in + i.d_out) for i in a.modules.values())
    assert cfg["mergekit_lora.portable"] == {"rank": top, "padding_params": added}
    assert (added > 0) == (case == "patterns")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_shape()[0 if "lora_A" in k else 1] for k in f.keys()} == {top}
    want = outputs(peft_model(src), "llama")
    got = outputs(peft_model(tmp_path / "out"), "llama")
    assert rel(got, want) < 1e-6
    assert not torch.allclose(want, outputs(MODELS["llama"](0), "llama"))
    assert serving_warnings(load_adapter(tmp_path / "out")) == []


def test_portable_bf16_and_explicit_rank(tmp_path):
    src = make_peft_adapter(tmp_path / "src", "llama", **CASES["patterns"])
    _, cfg, written = _write(tmp_path, src, dtype=torch.bfloat16, rank=8)
    assert written["r"] == written["lora_alpha"] == 8
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    got = outputs(peft_model(tmp_path / "out"), "llama")
    assert rel(got, outputs(peft_model(src), "llama")) < 2e-2  # bf16 rounding only
    a = load_adapter(src)
    with pytest.raises(LoraMergeError, match="below"), atomic_output(tmp_path / "o2") as tmp:
        write_peft(tmp, a.iter_units(), a.meta, profile="portable", rank=2)
    with pytest.raises(LoraMergeError, match="profile"), atomic_output(tmp_path / "o3") as tmp:
        write_peft(tmp, a.iter_units(), a.meta, profile="vllm")


def test_serving_warnings_name_the_refused_features(tmp_path):
    src = make_peft_adapter(tmp_path / "src", "llama", **CASES["patterns"])
    text = " | ".join(serving_warnings(load_adapter(src)))
    for word in ("rank_pattern", "alpha_pattern", "different ranks (2, 4, 6)", "use_rslora"):
        assert word in text
    plain = make_peft_adapter(tmp_path / "plain", "llama", r=4, lora_alpha=8)
    assert serving_warnings(load_adapter(plain)) == []
