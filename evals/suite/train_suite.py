"""Train one LoRA per suite task on SmolLM2-135M-Instruct with ``peft`` (CPU, minutes, fixed seeds).

    python evals/suite/train_suite.py --out examples/suite

Each adapter: r=8, alpha=16 on the attention projections (q, k, v, o), trained to predict the task's
label word after the prompt (full-vocabulary cross-entropy of the label token, frozen LM head), then
saved in float16 (a few MB each).  These folders are the README's demo inputs for ``loramerge eval``.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergekit_lora.atomic import atomic_output
from mergekit_lora.evals.suite.data import TASKS, get_task
from mergekit_lora.evals.suite.model import SMOLLM2, SMOLLM2_HUB_ID
from mergekit_lora.evals.tasks import encode_task, last_logits, load_base, pad_id_of, score
from mergekit_lora.pipeline import resolve_device

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def to_fp16(folder: Path) -> None:
    """Store the adapter in float16 (PEFT upcasts it to the model's dtype on load)."""
    f = folder / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})


def train_task(model, tok, name: str, out: Path, *, steps: int, batch_size: int, lr: float, rank: int,
               seed: int, max_text_tokens: int, force: bool, device: torch.device) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    task = get_task(name)
    train, test = task.split()
    enc = encode_task(task, tok, train, max_text_tokens)
    pad = pad_id_of(tok)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.peft_config["default"].base_model_name_or_path = SMOLLM2_HUB_ID
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    pm.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order = list(range(len(enc)))
            rng.shuffle(order)
        idx, order = order[:batch_size], order[batch_size:]
        logits = last_logits(pm, [enc.ids[i] for i in idx], device, pad)
        loss = torch.nn.functional.cross_entropy(logits, enc.label_tokens[enc.gold[idx]].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"  {name} step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    pm.eval()
    with atomic_output(out, force) as tmp:
        pm.save_pretrained(str(tmp))
        to_fp16(tmp)
    pm.unload()
    model.train(False)
    return {"train_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("examples/suite"))
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-text-tokens", type=int, default=64)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    model, tok = load_base(SMOLLM2, device)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, name in enumerate(args.tasks):
        info = train_task(model, tok, name, args.out / name, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, rank=args.rank, seed=args.seed + i, max_text_tokens=args.max_text_tokens,
                          force=args.force, device=device)
        from mergekit_lora.evals.tasks import attached

        t = get_task(name)
        enc = encode_task(t, tok, t.test(args.eval_examples), args.max_text_tokens)
        base = score(model, enc, pad_id=pad_id_of(tok))
        with attached(model, args.out / name) as m:
            own = score(m, enc, pad_id=pad_id_of(tok))
        print(f"{name}: base acc {base.accuracy:.3f} -> adapter acc {own.accuracy:.3f} "
              f"(loss {base.loss:.3f} -> {own.loss:.3f}; {info['train_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
