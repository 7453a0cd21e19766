"""Tiny real models and real PEFT adapters for tests (built from configs: no download)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

VOCAB = 97


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


class TinyConvNet(nn.Module):
    """A custom module with a 3×3 conv and a linear: PEFT's conv LoRA path on a real nn.Module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).mean(dim=(2, 3)))


def tiny_conv(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "conv": tiny_conv}


def make_peft_adapter(path: Path, model: str = "llama", *, seed: int = 1, base_seed: int = 0, scale_b: float = 0.5,
                      **lora_kwargs) -> Path:
    """Attach a LoRA with ``peft``, randomise A and B (seeded), save with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    base = MODELS[model](base_seed)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    kwargs.update(lora_kwargs)
    pm = get_peft_model(base, LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale_b)
    pm.save_pretrained(str(path))
    return Path(path)


def peft_model(path: Path, model: str = "llama", base_seed: int = 0) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(MODELS[model](base_seed), str(path)).eval()


def peft_deltas(path: Path, model: str = "llama", base_seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW per module: merge_and_unload() weight minus the base weight."""
    base = MODELS[model](base_seed)
    ref = copy.deepcopy(base.state_dict())
    merged = peft_model(path, model, base_seed).merge_and_unload().state_dict()
    out = {}
    for k, v in merged.items():
        if k.endswith(".weight") and k in ref and not torch.equal(v, ref[k]):
            out[k[: -len(".weight")]] = v - ref[k]
    return out


def inputs_for(model: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if model == "conv":
        return {"x": torch.randn(batch, 3, 6, 6, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)}


def outputs(m: nn.Module, model: str, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = m(**inputs_for(model, seed=seed))
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
