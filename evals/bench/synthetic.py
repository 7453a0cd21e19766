"""Synthetic Llama-shaped PEFT adapters for the benchmarks (random factors, fixed seeds; not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJ = [("self_attn.q_proj", "h", "h"), ("self_attn.k_proj", "h", "h"), ("self_attn.v_proj", "h", "h"),
        ("self_attn.o_proj", "h", "h"), ("mlp.gate_proj", "i", "h"), ("mlp.up_proj", "i", "h"),
        ("mlp.down_proj", "h", "i")]


def make_adapters(folder: Path, n: int, layers: int, hidden: int, inter: int, rank: int) -> list[Path]:
    """``n`` rank-``rank`` adapters on every projection of ``layers`` Llama layers, in ``folder/adapterNNNN``
    (reused when already written: the seeds make them identical)."""
    dims = {"h": hidden, "i": inter}
    paths = []
    for a in range(n):
        p = folder / f"adapter{a:04d}"
        paths.append(p)
        if (p / "adapter_model.safetensors").exists():
            continue
        p.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(a)
        tensors = {}
        for layer in range(layers):
            for name, out_d, in_d in PROJ:
                key = f"base_model.model.model.layers.{layer}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, dims[in_d], generator=g) / dims[in_d] ** 0.5
                tensors[f"{key}.lora_B.weight"] = torch.randn(dims[out_d], rank, generator=g) * 0.01
        save_file(tensors, str(p / "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "base_model_name_or_path": "synthetic-llama",
               "target_modules": sorted({n.split(".")[-1] for n, _, _ in PROJ}), "task_type": "CAUSAL_LM"}
        (p / "adapter_config.json").write_text(json.dumps(cfg))
    return paths
