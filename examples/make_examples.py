"""Train the two small example adapters shipped in examples/ (deterministic, ~10 s on CPU).

A tiny Llama is built from a config (no download) and saved to examples/tiny-llama; two LoRAs of
different ranks are trained with peft on two synthetic next-token tasks:
  - tiny-llama-shift  (r=4, alpha=8):  predict (t + 1) mod V
  - tiny-llama-double (r=8, alpha=16, rsLoRA): predict (2 t) mod V
Run:  python examples/make_examples.py [--out examples]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
TASKS = {
    "tiny-llama-shift": (lambda t: (t + 1) % VOCAB, dict(r=4, lora_alpha=8)),
    "tiny-llama-double": (lambda t: (2 * t) % VOCAB, dict(r=8, lora_alpha=16, use_rslora=True)),
}


def base_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def train(out: Path, name: str, steps: int = 200, seed: int = 0) -> None:
    target_fn, lora = TASKS[name]
    torch.manual_seed(seed)
    model = get_peft_model(base_model(), LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                     task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (16, 8), generator=g)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target_fn(x).reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.peft_config["default"].base_model_name_or_path = "examples/tiny-llama"
    model.save_pretrained(str(out / name))
    print(f"{name}: final loss {loss.item():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    base_model().save_pretrained(str(args.out / "tiny-llama"))
    for name in TASKS:
        train(args.out, name)


if __name__ == "__main__":
    main()
