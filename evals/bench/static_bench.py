"""Benchmark: our static merges vs PEFT's ``add_weighted_adapter`` on the same synthetic adapters.

Synthetic rank-r adapters on a Llama-shaped model built from a config (all seven projections per
layer), written as real PEFT folders by ``save_pretrained``.  Every measurement runs in its own
subprocess, which reports its wall time and its own peak RSS (``resource.getrusage``), so methods do
not pollute each other.  Ours: the full ``mergekit_lora.merge`` (read, merge, write, card).
PEFT: base model + adapters loaded once (timed apart), then ``add_weighted_adapter`` and
``save_pretrained`` of the result.  A second table shows our peak RSS at two layer counts.

    python evals/bench/static_bench.py --layers 8 --hidden 1024 --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

# ours -> (PEFT combination_type with the same ΔW semantics, our params)
METHODS = {
    "linear": ("linear", {}),
    "cat": ("cat", {}),
    "svd": ("svd", {}),
    "ties": ("ties_svd", {"density": 0.5}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(layers: int, hidden: int):
    from transformers import LlamaConfig

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


def child_ours(args: argparse.Namespace) -> dict:
    from mergekit_lora.pipeline import merge

    paths = sorted(str(p) for p in Path(args.work).glob("adapter*"))
    w = [1.0 / len(paths)] * len(paths)
    t0 = time.perf_counter()
    res = merge(paths, args.method, Path(args.work) / f"out-ours-{args.method}", weights=w,
                params=METHODS[args.method][1], device=args.device, force=True)
    return {"seconds": time.perf_counter() - t0, "report": res.report,
            "rel_error": res.fidelity["overall"]["rel_error"]}


def child_peft(args: argparse.Namespace) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    work = Path(args.work)
    paths = sorted(work.glob("adapter*"))
    t0 = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(work / "base", torch_dtype=torch.float32).to(args.device)
    pm = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")
    t1 = time.perf_counter()
    combination, params = METHODS[args.method]
    w = [1.0 / len(paths)] * len(paths)
    pm.add_weighted_adapter([f"a{i}" for i in range(len(paths))], w, "m", combination_type=combination,
                            density=params.get("density"))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    pm.save_pretrained(str(work / f"out-peft-{args.method}"), selected_adapters=["m"])
    t3 = time.perf_counter()
    return {"seconds": t3 - t1, "merge_seconds": t2 - t1, "load_seconds": t1 - t0}


def child_idle(args: argparse.Namespace) -> dict:
    import torch  # noqa: F401  (the interpreter + torch baseline)

    import mergekit_lora.pipeline  # noqa: F401
    return {"seconds": 0.0}


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (reset by exec, unlike ru_maxrss, which keeps the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(kind: str, method: str, work: Path, device: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--method", method, "--work", str(work), "--device", device,
           "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mem-layers", default="", help="layer counts for the memory table (default: layers/4, layers)")
    ap.add_argument("--workdir", default="out/bench-static")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS-static.md")))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per run, same for both sides (1: least noise on a shared machine)")
    ap.add_argument("--child", choices=["ours", "peft", "idle"])
    ap.add_argument("--method", default="linear")
    ap.add_argument("--work", default="")
    args = ap.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = {"ours": child_ours, "peft": child_peft, "idle": child_idle}[args.child](args)
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return

    root = Path(args.workdir)
    work = root / f"L{args.layers}-H{args.hidden}-n{args.adapters}-r{args.rank}"
    print(f"building inputs in {work} …", flush=True)
    build(work, args.layers, args.hidden, args.adapters, args.rank, with_base=True)
    idle = run_child("idle", "linear", work, args.device, args.threads)
    rows = []
    for m in args.methods.split(","):
        ours = run_child("ours", m, work, args.device, args.threads)
        print(f"{m}: ours {ours['seconds']:.2f} s", flush=True)
        peft = run_child("peft", m, work, args.device, args.threads)
        print(f"{m}: peft {peft['merge_seconds']:.2f} s (+save {peft['seconds'] - peft['merge_seconds']:.2f} s)",
              flush=True)
        rows.append((m, ours, peft))

    mem_layers = [int(x) for x in args.mem_layers.split(",") if x] or [max(args.layers // 4, 1), args.layers]
    mem = []
    for L in mem_layers:
        wl = root / f"L{L}-H{args.hidden}-n{args.adapters}-r{args.rank}"
        build(wl, L, args.hidden, args.adapters, args.rank, with_base=False)
        mem.append((L, {m: run_child("ours", m, wl, args.device, args.threads)["peak_rss_mb"] for m in ("linear", "svd", "ties")}))

    inter = llama_config(args.layers, args.hidden).intermediate_size
    lines = [
        "# Static merges: mergekit-lora vs PEFT `add_weighted_adapter`", "",
        f"Command: `python evals/bench/static_bench.py --layers {args.layers} --hidden {args.hidden} "
        f"--adapters {args.adapters} --rank {args.rank} --device {args.device} --threads {args.threads}`", "",
        f"Machine: {machine()}; each run limited to {args.threads} torch thread(s)", "",
        f"Inputs: {args.adapters} synthetic rank-{args.rank} PEFT adapters on a Llama layout with {args.layers} layers, "
        f"hidden {args.hidden}, intermediate {inter}, all 7 projections ({7 * args.layers} modules), fp32, "
        f"weights 1/{args.adapters}.  PEFT side: `linear`→`linear`, `cat`→`cat`, `svd`→`svd`, `ties`→`ties_svd` "
        "(density 0.5; ours: randomised SVD refactorisation, default).  "
        "Ours = read + merge + write + card.  PEFT merge = `add_weighted_adapter` only; PEFT merge+save adds "
        "`save_pretrained`; PEFT load is loading the base model and the adapters, which PEFT needs and we do not.  "
        f"Peak RSS is each subprocess's own; an idle interpreter with torch imported: {idle['peak_rss_mb']:.0f} MB.",
        "",
        "| method | ours (s) | PEFT merge (s) | PEFT merge+save (s) | PEFT load (s) | speed-up vs PEFT merge "
        "| speed-up vs PEFT load+merge+save | ours peak RSS (MB) | PEFT peak RSS (MB) | ours rel. error vs Σ wᵢΔWᵢ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, o, p in rows:
        lines.append(f"| `{m}` | {o['seconds']:.2f} | {p['merge_seconds']:.2f} | {p['seconds']:.2f} | "
                     f"{p['load_seconds']:.2f} | **{p['merge_seconds'] / o['seconds']:.1f}×** | "
                     f"{(p['seconds'] + p['load_seconds']) / o['seconds']:.1f}× | {o['peak_rss_mb']:.0f} | "
                     f"{p['peak_rss_mb']:.0f} | {o['rel_error']:.2e} |")
    ties = next((o for m, o, _ in rows if m == "ties"), None)
    if ties and ties.get("report"):
        lines += ["", "`ties` refactorisation (randomised SVD) error ‖D − D_k‖/‖D‖, incl. the rank-k truncation: "
                  + ", ".join(f"{k}: {v:.3e}" if isinstance(v, float) else f"{k}: {v}" for k, v in ties["report"].items())]
    lines += ["", "## Peak memory vs. layer count (ours)", "",
              "| layers | modules | " + " | ".join(f"`{m}` peak RSS (MB)" for m in ("linear", "svd", "ties")) + " |",
              "|---|---|---|---|---|"]
    for L, d in mem:
        lines.append(f"| {L} | {7 * L} | " + " | ".join(f"{d[m]:.0f}" for m in ("linear", "svd", "ties")) + " |")
    lines.append("")
    Path(args.results).write_text("\n".join(lines))
    Path(args.results).with_suffix(".json").write_text(json.dumps({"rows": rows, "memory": mem, "idle": idle},
                                                                  indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
