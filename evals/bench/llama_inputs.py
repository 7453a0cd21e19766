"""Synthetic Llama-shaped inputs for the benchmarks: a base model and n PEFT adapters with random factors.

``build`` goes through PEFT (small layouts; the base is saved when PEFT needs it), ``build_direct`` writes
the adapter files itself (TinyLlama-1.1B size without a 1.1 B-parameter PEFT model in memory).  Both
reuse folders that already exist.  Used by static_bench.py, scaling_bench.py and thread_bench.py.
"""

from __future__ import annotations

from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(layers: int, hidden: int, preset: str = ""):
    from transformers import LlamaConfig

    if preset == "tinyllama":
        return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           tie_word_embeddings=False, torch_dtype="bfloat16")
    return LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                       num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                       num_key_value_heads=max(hidden // 256, 1), max_position_embeddings=128,
                       tie_word_embeddings=False)


def build(work: Path, layers: int, hidden: int, n_adapters: int, rank: int, with_base: bool) -> list[Path]:
    """Save the base model (when PEFT needs it) and n PEFT adapters with random factors; reuse if present."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    paths = [work / f"adapter{i}" for i in range(n_adapters)]
    if all((p / "adapter_model.safetensors").exists() for p in paths) and (
            not with_base or (work / "base" / "config.json").exists()):
        return paths
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(layers, hidden))
    if with_base:
        base.save_pretrained(work / "base")
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    for i, p in enumerate(paths):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, t in pm.named_parameters():
                if "lora_" in n:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        pm.save_pretrained(p)
    return paths


def build_direct(work: Path, layers: int, n_adapters: int, rank: int, preset: str, hidden: int = 0,
                 with_base: bool = True) -> list[Path]:
    """A bf16 base of zeros (saved by transformers) and PEFT adapter folders written directly (no
    1.1 B-parameter PEFT model in memory): keys and adapter_config.json exactly as PEFT saves them."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    cfg = llama_config(layers, hidden, preset)
    paths = [work / f"adapter{i}" for i in range(n_adapters)]
    if with_base and not (work / "base" / "config.json").exists():
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():
            for t in model.parameters():
                t.zero_()
        model.save_pretrained(work / "base")
        del model
    shapes = {"self_attn.q_proj": (cfg.hidden_size, cfg.hidden_size),
              "self_attn.k_proj": (cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads),
              "self_attn.v_proj": (cfg.hidden_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads),
              "self_attn.o_proj": (cfg.hidden_size, cfg.hidden_size),
              "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
              "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
              "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    dtype = torch.bfloat16 if preset == "tinyllama" else torch.float32
    for i, p in enumerate(paths):
        if (p / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for layer in range(layers):
            for mod, (d_in, d_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{mod}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * 0.02).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.02).to(dtype)
        p.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(p / "adapter_model.safetensors"), metadata={"format": "pt"})
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                   base_model_name_or_path=str((work / "base").resolve()) if with_base else None).save_pretrained(str(p))
    return paths
