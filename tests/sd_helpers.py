"""Tiny real SD modules (diffusers UNet, CLIP text encoder, built from configs) and LoRA state dicts with their real names."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# kohya's default LoRA targets: attention blocks, plus (with conv_dim) resnets and up/down samplers.
_UNET_TARGET = re.compile(r"(attentions|resnets|downsamplers|upsamplers)\.")


def tiny_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def tiny_clip(seed: int = 0) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16)
    return CLIPTextModel(cfg).eval()


@lru_cache(maxsize=1)
def sd_modules() -> dict[str, tuple[int, ...]]:
    """diffusers module path (with component) -> base weight shape, for the targeted Linear/Conv2d layers."""
    out: dict[str, tuple[int, ...]] = {}
    for comp, model in (("unet", tiny_unet()), ("text_encoder", tiny_clip())):
        for n, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and (comp != "unet" or _UNET_TARGET.search(n)):
                if comp == "text_encoder" and "encoder.layers" not in n:
                    continue
                out[f"{comp}.{n}"] = tuple(m.weight.shape)
    return out


def kohya_of(module: str) -> str:
    comp, _, path = module.partition(".")
    return ("lora_unet_" if comp == "unet" else "lora_te_") + path.replace(".", "_")


def factors_for(shape: tuple[int, ...], r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of a real LoRA for a weight of ``shape``: conv down [r, in, kh, kw], up [out, r, 1, 1]."""
    out_f, in_f = shape[0], shape[1]
    if len(shape) == 4:
        return torch.randn(r, in_f, *shape[2:], generator=g) * 0.3, torch.randn(out_f, r, 1, 1, generator=g) * 0.3
    return torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3


def kohya_state_dict(seed: int = 1, r: int = 4, alpha: float | None = 2.0, only: str | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for mod, shape in sd_modules().items():
        if only and not mod.startswith(only):
            continue
        down, up = factors_for(shape, r, g)
        k = kohya_of(mod)
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(alpha)
    return sd


def diffusers_state_dict(seed: int = 1, r: int = 4, style: str = "peft") -> dict[str, torch.Tensor]:
    """diffusers keys in one of the accepted styles: peft (lora_A/B), lora (.lora.down), linear_layer, processor."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for mod, shape in sd_modules().items():
        down, up = factors_for(shape, r, g)
        if style == "peft":
            a, b = f"{mod}.lora_A.weight", f"{mod}.lora_B.weight"
        elif style == "lora":
            a, b = f"{mod}.lora.down.weight", f"{mod}.lora.up.weight"
        elif style == "linear_layer":
            a, b = f"{mod}.lora_linear_layer.down.weight", f"{mod}.lora_linear_layer.up.weight"
        else:  # attention-processor style where it exists, the .lora style elsewhere
            m = re.match(r"(.+)\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)$", mod)
            if m:
                proc = {"to_out.0": "to_out", "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v",
                        "out_proj": "to_out"}.get(m.group(2), m.group(2))
                a = f"{m.group(1)}.processor.{proc}_lora.down.weight"
                b = a.replace(".down.", ".up.")
            else:
                a, b = f"{mod}.lora.down.weight", f"{mod}.lora.up.weight"
        sd[a], sd[b] = down, up
    return sd


def save(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)
    return path


def kohya_delta(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of one kohya module computed directly from the file's tensors (alpha/r · up @ down)."""
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else r
    d = (alpha / r) * (up.reshape(up.shape[0], r) @ down.reshape(r, -1))
    return d.reshape(up.shape[0], *down.shape[1:])
