"""Benchmark: our static merges vs PEFT's ``add_weighted_adapter`` on the same synthetic adapters.

Synthetic rank-r adapters on a Llama-shaped model built from a config (all seven projections per
layer), written as real PEFT folders by ``save_pretrained``.  Every measurement runs in its own
subprocess, which reports its wall time and its own peak RSS (``resource.getrusage``), so methods do
not pollute each other.  Ours: the full ``mergekit_lora.merge`` (read, merge, write, card).
PEFT: base model + adapters loaded once (timed apart), then ``add_weighted_adapter`` and
``save_pretrained`` of the result.  A second table shows our peak RSS at two layer counts.

    python evals/bench/static_bench.py --layers 8 --hidden 1024 --device cpu

Whole-process mode (``--whole-process``): each side is one fresh process timed from the outside
(interpreter start, imports, reading, merging, writing; peak RSS from ``wait4``): ours is the CLI
``python -m mergekit_lora.cli.main merge …``, PEFT a script that loads the base and the adapters,
calls ``add_weighted_adapter`` and ``save_pretrained``.  ``--preset tinyllama`` builds a
TinyLlama-1.1B-shaped bf16 base from a config (22 layers, hidden 2048, intermediate 5632, 32 heads,
4 KV heads, vocabulary 32000; zero weights: the merge never reads them, PEFT loads them all) and
rank-16 bf16 adapters on all 7 projections written directly as PEFT folders.  The last column is
‖ΔW_ours − ΔW_PEFT‖/‖ΔW_PEFT‖ over all modules (factor space).

    python evals/bench/static_bench.py --preset tinyllama --adapters 4 --whole-process --results evals/bench/RESULTS-e2e.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from llama_inputs import build, build_direct, llama_config

# ours -> (PEFT combination_type with the same ΔW semantics, our params)
METHODS = {
    "linear": ("linear", {}),
    "cat": ("cat", {}),
    "svd": ("svd", {}),
    "ties": ("ties_svd", {"density": 0.5}),
    "dare_ties": ("dare_ties_svd", {"density": 0.5}),
    "magnitude_prune": ("magnitude_prune_svd", {"density": 0.5}),
}
PRESET = ""  # set from --preset in main (children get it on their command line)
OURS_ONLY = {"lego": {"k": 16}}  # methods without a PEFT counterpart (scaling_bench.py)
def child_ours(args: argparse.Namespace) -> dict:
    from mergekit_lora.pipeline import merge

    paths = sorted(str(p) for p in Path(args.work).glob("adapter*"))
    w = [1.0 / len(paths)] * len(paths)
    t0, c0 = time.perf_counter(), time.process_time()
    res = merge(paths, args.method, Path(args.work) / f"out-ours-{args.method}", weights=w,
                params=METHODS[args.method][1] if args.method in METHODS else OURS_ONLY[args.method],
                device=args.device, force=True)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "report": res.report,
            "rel_error": res.fidelity["overall"]["rel_error"]}


def child_peft(args: argparse.Namespace) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    work = Path(args.work)
    paths = sorted(work.glob("adapter*"))
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if args.preset == "tinyllama" else torch.float32
    base = LlamaForCausalLM.from_pretrained(work / "base", torch_dtype=dtype).to(args.device)
    pm = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")
    t1, c1 = time.perf_counter(), time.process_time()
    combination, params = METHODS[args.method]
    w = [1.0 / len(paths)] * len(paths)
    pm.add_weighted_adapter([f"a{i}" for i in range(len(paths))], w, "m", combination_type=combination,
                            density=params.get("density"))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t2, c2 = time.perf_counter(), time.process_time()
    pm.save_pretrained(str(work / f"out-peft-{args.method}"), selected_adapters=["m"])
    t3 = time.perf_counter()
    return {"seconds": t3 - t1, "merge_seconds": t2 - t1, "merge_cpu_seconds": c2 - c1, "load_seconds": t1 - t0}


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
           "--threads", str(threads), "--preset", PRESET]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # both sides: the same thread budget
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import os

    return f"{platform.system()} {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def timed(cmd: list[str], threads: int) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) of one whole process (/usr/bin/time)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "TIMED %M %U %S", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{cmd} failed:\n{r.stderr[-3000:]}")
    _, rss, user, system = next(x.split() for x in reversed(r.stderr.splitlines()) if x.startswith("TIMED"))
    return {"seconds": wall, "cpu_seconds": float(user) + float(system), "peak_rss_mb": int(rss) / 1024}


def output_rel_error(ours: Path, peft: Path) -> float:
    """‖ΔW_ours − ΔW_PEFT‖ / ‖ΔW_PEFT‖ over all modules, in factor space (float64 Grams)."""
    import torch

    from mergekit_lora import load_adapter

    a = load_adapter(str(ours))
    b = load_adapter(str(peft / "m" if (peft / "m").exists() else peft))
    e2 = t2 = 0.0
    for name in b.module_names():
        ub, ua = b.units(name).to(dtype=torch.float64), a.units(name).to(dtype=torch.float64)
        e2 += ua.distance(ub) ** 2
        t2 += ub.norm_sq()
    return (e2 / t2) ** 0.5 if t2 else 0.0


def fastest(runs: list[dict]) -> dict:
    """Wall and CPU seconds: the minimum of each over the runs (on a shared machine the least-disturbed
    run is the best estimate of each); peak RSS: the largest."""
    return {"seconds": min(r["seconds"] for r in runs), "cpu_seconds": min(r["cpu_seconds"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def whole_process_main(args: argparse.Namespace) -> None:
    layers = 22 if args.preset == "tinyllama" and args.layers == 8 else args.layers
    root = Path(args.workdir)
    tag = args.preset or f"H{args.hidden}"
    work = root / f"{tag}-L{layers}-n{args.adapters}-r{args.rank}"
    print(f"building inputs in {work} …", flush=True)
    if args.preset:
        paths = build_direct(work, layers, args.adapters, args.rank, args.preset)
    else:
        paths = build(work, layers, args.hidden, args.adapters, args.rank, with_base=True)
    w = ",".join([f"{1 / len(paths):.6g}"] * len(paths))
    rows = []
    for m in args.methods.split(","):
        out_ours = work / f"out-ours-{m}"
        extra = [f"--density={METHODS[m][1]['density']}"] if "density" in METHODS[m][1] else []
        cmd = [sys.executable, "-m", "mergekit_lora.cli.main", "merge", *map(str, paths), "-m", m, "-o", str(out_ours),
               "--weights", w, "--device", args.device, "--force", "--scale", "none", *extra]  # PEFT: no strength policy
        with_peft = args.peft_methods is None or m in args.peft_methods.split(",")
        pcmd = [sys.executable, __file__, "--child", "peft", "--method", m, "--work", str(work), "--device", args.device,
                "--threads", str(args.threads), "--preset", args.preset]
        ours_runs: list[dict] = []
        peft_runs: list[dict] = []
        # alternated (ours, PEFT, ours, …): both sides see the same machine state over the run
        for i in range(max(args.repeat, args.peft_repeat if with_peft else 0)):
            if i < args.repeat:
                ours_runs.append(timed(cmd, args.threads))
                print(f"{m}: ours run {i + 1}: {ours_runs[-1]['cpu_seconds']:.2f} CPU s", flush=True)
            if with_peft and i < args.peft_repeat:
                peft_runs.append(timed(pcmd, args.threads))
                print(f"{m}: peft run {i + 1}: {peft_runs[-1]['cpu_seconds']:.2f} CPU s", flush=True)
        ours = fastest(ours_runs)
        print(f"{m}: ours {ours['seconds']:.2f} s ({ours['cpu_seconds']:.2f} CPU s), {ours['peak_rss_mb']:.0f} MB",
              flush=True)
        if not with_peft:
            rows.append((m, ours, None, None))
            continue
        peft = fastest(peft_runs)
        print(f"{m}: peft {peft['seconds']:.2f} s ({peft['cpu_seconds']:.2f} CPU s), {peft['peak_rss_mb']:.0f} MB",
              flush=True)
        rel = output_rel_error(out_ours, work / f"out-peft-{m}")
        rows.append((m, ours, peft, rel))
    cfg = llama_config(layers, args.hidden, args.preset)
    lines = [
        "# Whole process: `loramerge merge` vs a PEFT load + `add_weighted_adapter` + `save_pretrained` script", "",
        f"Command: `python evals/bench/static_bench.py --whole-process{' --preset ' + args.preset if args.preset else ''} "
        f"--layers {layers} --hidden {cfg.hidden_size} --adapters {args.adapters} --rank {args.rank} --methods {args.methods} "
        f"--repeat {args.repeat} --peft-repeat {args.peft_repeat} --threads {args.threads}"
        + (f" --peft-methods {args.peft_methods}" if args.peft_methods is not None else "") + "`", "",
        f"Machine: {machine()}, shared with other jobs (load average ≫ 2 during the runs); OMP_NUM_THREADS="
        f"{args.threads} for both sides.  Wall time of the whole process (start-up, imports, reading, merging, "
        "writing), its CPU time (user + system: what the merge costs, less sensitive to the other jobs than wall time) "
        "and its peak RSS (`/usr/bin/time`); ours and PEFT alternated in this one run; ours fastest of "
        f"{args.repeat}, PEFT fastest of {args.peft_repeat}.", "",
        f"Inputs: {args.adapters} rank-{args.rank} PEFT adapters ({'bf16' if args.preset else 'fp32'}) on all 7 "
        f"projections of a {layers}-layer Llama (hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}"
        f"{', TinyLlama-1.1B shapes, bf16 base built from a config' if args.preset else ''}), weights 1/{args.adapters}. "
        "PEFT: `linear`→`linear`, `cat`→`cat`, `svd`→`svd`, `ties`→`ties_svd` (density 0.5).  "
        "rel. error = ‖ΔW_ours − ΔW_PEFT‖/‖ΔW_PEFT‖ over all modules (PEFT's `linear` is not Σ wᵢΔWᵢ, see README).", "",
        "| method | ours wall (s) | PEFT wall (s) | speed-up (wall) | ours CPU (s) | PEFT CPU (s) | speed-up (CPU) "
        "| ours peak RSS (MB) | PEFT peak RSS (MB) | rel. error vs PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for m, o, p, rel in rows:
        if p is None:
            lines.append(f"| `{m}` | {o['seconds']:.2f} | not run | | {o['cpu_seconds']:.2f} | not run | | "
                         f"{o['peak_rss_mb']:.0f} | | |")
            continue
        lines.append(f"| `{m}` | {o['seconds']:.2f} | {p['seconds']:.2f} | **{p['seconds'] / o['seconds']:.1f}×** | "
                     f"{o['cpu_seconds']:.2f} | {p['cpu_seconds']:.2f} | **{p['cpu_seconds'] / o['cpu_seconds']:.1f}×** | "
                     f"{o['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} | {rel:.2e} |")
    lines.append("")
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mem-layers", default="", help="layer counts for the memory table (default: layers/4, layers; none: no table)")
    ap.add_argument("--workdir", default="out/bench-static")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS-static.md")))
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per run, same for both sides (1: least noise on a shared machine)")
    ap.add_argument("--preset", default="", choices=["", "tinyllama"],
                    help="tinyllama: TinyLlama-1.1B shapes (22 layers unless --layers given), bf16")
    ap.add_argument("--whole-process", action="store_true",
                    help="time whole processes: the loramerge CLI vs a PEFT load+merge+save script")
    ap.add_argument("--repeat", type=int, default=1, help="fastest of N runs of ours")
    ap.add_argument("--peft-repeat", type=int, default=1, help="whole-process: fastest of N runs of PEFT")
    ap.add_argument("--peft-methods", default=None,
                    help="whole-process: methods to run PEFT for (default: all; PEFT's svd/ties_svd take 10+ min "
                         "at TinyLlama size)")
    ap.add_argument("--child", choices=["ours", "peft", "idle"])
    ap.add_argument("--method", default="linear")
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    global PRESET
    PRESET = args.preset

    if args.whole_process and not args.child:
        whole_process_main(args)
        return
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
        runs = [run_child("ours", m, work, args.device, args.threads) for _ in range(args.repeat)]
        ours = dict(min(runs, key=lambda r: r["cpu_seconds"]), seconds=min(r["seconds"] for r in runs))
        print(f"{m}: ours {ours['seconds']:.2f} s ({ours['cpu_seconds']:.2f} CPU s)", flush=True)
        peft = run_child("peft", m, work, args.device, args.threads)
        print(f"{m}: peft {peft['merge_seconds']:.2f} s ({peft['merge_cpu_seconds']:.2f} CPU s) "
              f"(+save {peft['seconds'] - peft['merge_seconds']:.2f} s)", flush=True)
        rows.append((m, ours, peft))

    mem_layers = [] if args.mem_layers == "none" else (
        [int(x) for x in args.mem_layers.split(",") if x] or [max(args.layers // 4, 1), args.layers])
    mem = []
    for L in mem_layers:
        wl = root / f"L{L}-H{args.hidden}-n{args.adapters}-r{args.rank}"
        build(wl, L, args.hidden, args.adapters, args.rank, with_base=False)
        mem.append((L, {m: run_child("ours", m, wl, args.device, args.threads)["peak_rss_mb"] for m in ("linear", "svd", "ties")}))

    inter = llama_config(args.layers, args.hidden).intermediate_size
    lines = [
        "# Static merges: mergekit-lora vs PEFT `add_weighted_adapter`", "",
        f"Command: `python evals/bench/static_bench.py --layers {args.layers} --hidden {args.hidden} "
        f"--adapters {args.adapters} --rank {args.rank} --device {args.device} --threads {args.threads} "
        f"--methods {args.methods} --repeat {args.repeat} --mem-layers {args.mem_layers or 'default'}`", "",
        f"Machine: {machine()}; each run limited to {args.threads} torch thread(s)", "",
        f"Inputs: {args.adapters} synthetic rank-{args.rank} PEFT adapters on a Llama layout with {args.layers} layers, "
        f"hidden {args.hidden}, intermediate {inter}, all 7 projections ({7 * args.layers} modules), fp32, "
        f"weights 1/{args.adapters}.  PEFT side: `linear`→`linear`, `cat`→`cat`, `svd`→`svd`, `ties`→`ties_svd`, "
        "`dare_ties`→`dare_ties_svd`, `magnitude_prune`→`magnitude_prune_svd` (density 0.5; ours: default "
        "refactorisation, exact SVD or subspace iteration by size).  "
        f"Ours = read + merge + write + card, fastest of {args.repeat}; ours CPU = `time.process_time` of that call.  "
        "PEFT merge = `add_weighted_adapter` only (wall and CPU); PEFT merge+save adds "
        "`save_pretrained`; PEFT load is loading the base model and the adapters, which PEFT needs and we do not.  "
        f"Peak RSS is each subprocess's own; an idle interpreter with torch imported: {idle['peak_rss_mb']:.0f} MB.",
        "",
        "| method | ours (s) | PEFT merge (s) | PEFT merge+save (s) | PEFT load (s) | speed-up vs PEFT merge "
        "| speed-up vs PEFT load+merge+save | ours CPU (s) | PEFT merge CPU (s) | speed-up (CPU) "
        "| ours peak RSS (MB) | PEFT peak RSS (MB) | ours rel. error vs Σ wᵢΔWᵢ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, o, p in rows:
        lines.append(f"| `{m}` | {o['seconds']:.2f} | {p['merge_seconds']:.2f} | {p['seconds']:.2f} | "
                     f"{p['load_seconds']:.2f} | **{p['merge_seconds'] / o['seconds']:.1f}×** | "
                     f"{(p['seconds'] + p['load_seconds']) / o['seconds']:.1f}× | {o['cpu_seconds']:.2f} | "
                     f"{p.get('merge_cpu_seconds', float('nan')):.2f} | "
                     f"**{p.get('merge_cpu_seconds', float('nan')) / o['cpu_seconds']:.1f}×** | {o['peak_rss_mb']:.0f} | "
                     f"{p['peak_rss_mb']:.0f} | {o['rel_error']:.2e} |")
    ties = next((o for m, o, _ in rows if m == "ties"), None)
    if ties and ties.get("report"):
        lines += ["", "`ties` refactorisation error ‖D − D_k‖/‖D‖, incl. the rank-k truncation: "
                  + ", ".join(f"{k}: {v:.3e}" if isinstance(v, float) else f"{k}: {v}" for k, v in ties["report"].items())]
    if mem:
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
