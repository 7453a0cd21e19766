"""Inference overhead of rank routing vs a plain LoRA (tokens/s), written to RESULTS-routing.md.

A Llama-style model built from a config (no download), N LoRAs of rank r on q/k/v/o made with PEFT.
Rows: the base model; PEFT with the ``cat`` merge (a plain LoRA of rank N·r, unmerged); PEFT with one
rank-r LoRA; the routed adapter (implicit, gate, hierarchical routers) at top-k = r and R = N·r, plus
the runtime's variants (unfused projections, gathered B columns, torch.compile).  The section for
the device is appended to ``--out``.

    .venv/bin/python evals/bench/routing_bench.py [--device cpu|cuda] [--compile] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_lora import merge
from mergekit_lora.routing import load_routed
from mergekit_lora.routing.calibrate import make_batches
from mergekit_lora.routing.profile import fit_profiles
from mergekit_lora.routing.runtime import attach


def build(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def make_loras(root: Path, n: int, r: int) -> list[Path]:
    out = []
    for i in range(n):
        pm = get_peft_model(build(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj",
                                                                                        "v_proj", "o_proj"]))
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        pm.save_pretrained(str(root / f"lora{i}"))
        out.append(root / f"lora{i}")
    return out


@torch.no_grad()
def time_once(model: torch.nn.Module, ids: torch.Tensor, reps: int) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        model(input_ids=ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(models: dict[str, torch.nn.Module], ids: torch.Tensor, reps: int, rounds: int,
                ref: str) -> tuple[dict[str, float], dict[str, float]]:
    """(tokens/s fastest of ``rounds``, median over rounds of time(ref) / time(config)).  Every round times
    every configuration in turn, so load from other processes on a shared machine hits all rows alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)  # warm-up
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(time_once(m, ids, reps))
    tps = {name: ids.numel() * reps / min(t) for name, t in times.items()}
    ratio = {name: float(torch.tensor([a / b for a, b in zip(times[ref], t)]).median()) for name, t in times.items()}
    return tps, ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loras", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows (compile time reported)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-routing.md"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    ids = torch.randint(0, 2048, (args.batch, args.seq), device=dev)
    R, r = args.loras * args.rank, args.rank
    models: dict[str, torch.nn.Module] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loras = make_loras(root, args.loras, args.rank)
        merge(loras, "cat", root / "cat")
        models["base model (no adapter)"] = build().to(dev)
        models[f"PEFT LoRA, rank {r} (one input)"] = PeftModel.from_pretrained(build(), str(loras[0])).to(dev).eval()
        ref = f"PEFT LoRA, rank {R} (cat of all inputs)"
        models[ref] = PeftModel.from_pretrained(build(), str(root / "cat")).to(dev).eval()
        for router in ("implicit", "gate", "hierarchical"):
            merge(loras, "route", root / f"r-{router}", params={"top_k": r, "router": router})
            routed = load_routed(root / f"r-{router}")
            for k in (r, R) if router != "hierarchical" else (r,):
                m = build().to(dev)
                h = attach(m, routed, top_k=k)
                if router == "hierarchical":  # profiles from random token data, 4 sequences per input
                    g = torch.Generator().manual_seed(1)
                    data = [make_batches([(x, x) for x in torch.randint(0, 2048, (4, 64), generator=g).tolist()], 4)
                            for _ in loras]
                    fit_profiles(m, h, data, device=dev)
                    models[f"routed (hierarchical, top-1 adapter), R = {R}, top-k = {k}"] = m
                    continue
                models[f"routed ({router}), R = {R}, top-k = {k}"] = m
            if router != "hierarchical":
                m = build().to(dev)
                attach(m, routed, top_k=r, fuse=False)
                models[f"routed ({router}), top-k = {r}, unfused projections"] = m
        m = build().to(dev)
        for layer in attach(m, load_routed(root / "r-implicit"), top_k=r).layers.values():
            layer.sparse = True
        models[f"routed (implicit), top-k = {r}, gathered B columns (embedding_bag)"] = m
        if args.compile:
            m = build().to(dev)
            attach(m, load_routed(root / "r-implicit"), top_k=r)
            cm = torch.compile(m)
            t = time.perf_counter()
            with torch.no_grad():
                cm(input_ids=ids)
            notes.append(f"torch.compile of the routed (implicit, top-k = {r}) model: first call (compile) "
                         f"{time.perf_counter() - t:.1f} s.")
            models[f"routed (implicit), top-k = {r}, torch.compile"] = cm
        rows, ratios = interleaved(models, ids, args.reps, args.rounds, ref)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"## {dev_name}", "",
        f"`evals/bench/routing_bench.py --device {args.device}{' --compile' if args.compile else ''}`: "
        f"Llama-style model (hidden 512, 4 layers, vocab 2048) built from a config, {args.loras} LoRAs of rank "
        f"{args.rank} on q/k/v/o, batch {args.batch} × {args.seq} tokens, forward only (no_grad), float32; "
        f"every configuration timed in turn, fastest of {args.rounds} rounds of {args.reps} forwards. "
        f"Device: {dev_name}; torch {torch.__version__}.", "",
        "| configuration | tokens/s (fastest) | vs PEFT rank-R (fastest) | vs PEFT rank-R (median of rounds) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {tps:,.0f} | {tps / rows[ref]:.2f}× | {ratios[name]:.2f}× |" for name, tps in rows.items()]
    lines += [""] + notes + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        old = args.out.read_text() if args.out.is_file() else ""
        args.out.write_text(old.rstrip("\n") + "\n\n" + text if old else text)


if __name__ == "__main__":
    main()
