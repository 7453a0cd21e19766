"""Our reader's ΔW per module equals what PEFT itself applies (merge_and_unload), across config features."""

import pytest
import torch
from helpers import make_peft_adapter, peft_deltas, rel

from mergekit_lora import load_adapter

CASES = {
    "llama-basic": ("llama", dict(r=4, lora_alpha=8)),
    "llama-rslora-all": ("llama", dict(r=8, lora_alpha=16, use_rslora=True,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 6},
                                     alpha_pattern={"v_proj": 3, "down_proj": 32})),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert-embedding": ("bert", dict(r=3, lora_alpha=6, target_modules=["query", "value", "word_embeddings"])),
    "conv2d": ("conv", dict(r=2, lora_alpha=5, target_modules=["conv", "proj"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_delta_matches_peft_merge(tmp_path, case):
    model, kw = CASES[case]
    path = make_peft_adapter(tmp_path / case, model, **kw)
    expected = peft_deltas(path, model)
    adapter = load_adapter(path)
    assert set(adapter.module_names()) == set(expected)
    for name, dw in expected.items():
        ours = adapter.units(name).delta_weight()
        assert ours.shape == dw.shape, name
        assert rel(ours, dw) < 1e-6, (name, rel(ours, dw))


def test_rank_pattern_and_scales_are_per_module(tmp_path):
    model, kw = CASES["llama-patterns"]
    a = load_adapter(make_peft_adapter(tmp_path / "p", model, **kw))
    q = a.modules["model.layers.0.self_attn.q_proj"]
    v1 = a.modules["model.layers.1.self_attn.v_proj"]
    v0 = a.modules["model.layers.0.self_attn.v_proj"]
    assert (q.rank, q.alpha, q.scale) == (2, 8.0, 4.0)
    assert (v1.rank, v1.alpha, v1.scale) == (6, 3.0, 0.5)
    assert (v0.rank, v0.alpha, v0.scale) == (4, 3.0, 0.75)


def test_bare_safetensors_file_reads_with_sibling_config(tmp_path):
    path = make_peft_adapter(tmp_path / "a", "llama", r=4, lora_alpha=8)
    a = load_adapter(path / "adapter_model.safetensors")
    assert a.modules["model.layers.0.self_attn.q_proj"].scale == 2.0


def test_bare_file_without_config_assumes_scale_one(tmp_path):
    path = make_peft_adapter(tmp_path / "a", "llama", r=4, lora_alpha=8)
    lone = tmp_path / "lone"
    lone.mkdir()
    (path / "adapter_model.safetensors").rename(lone / "weights.safetensors")
    a = load_adapter(lone / "weights.safetensors")
    assert a.meta.extra["alpha_assumed"] is True
    assert all(i.scale == 1.0 for i in a.modules.values())


def test_lazy_loading_reads_only_the_requested_module(tmp_path, monkeypatch):
    from mergekit_lora.formats import tensors

    path = make_peft_adapter(tmp_path / "a", "llama", r=4)
    a = load_adapter(path)
    read = []
    orig = tensors.TensorSource.get
    monkeypatch.setattr(tensors.TensorSource, "get", lambda self, k: read.append(k) or orig(self, k))
    a.units("model.layers.1.self_attn.v_proj")
    assert sorted(read) == sorted([
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    ])


def test_half_precision_inputs_compute_in_float32(tmp_path):
    path = make_peft_adapter(tmp_path / "a", "llama", r=4)
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f))
    a = load_adapter(path)
    assert a.meta.dtype == "bfloat16"  # headers name dtypes (planning imports no torch)
    assert a.units("model.layers.0.self_attn.q_proj").A.dtype == torch.float32
