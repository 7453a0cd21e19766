"""Benchmark: how time and peak RSS scale with the number of adapters and of layers.

Synthetic rank-r fp32 PEFT adapters on a Llama layout (all 7 projections, written directly as PEFT
folders); each merge runs ``mergekit_lora.pipeline.merge`` in a fresh process (``static_bench.py``'s
child: in-process wall seconds of read + merge + fidelity + write, and the process's peak RSS),
fastest of ``--repeat``.  The tables give seconds per input MB, so "linear in input bytes" reads as
a flat column, and RSS at growing layer counts, so "flat in layers" reads as a flat row.

    python evals/bench/scaling_bench.py --adapters 2,4,8,16,32 --layers 8,16,32 --hidden 1024 --repeat 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import static_bench as sb  # noqa: E402
from llama_inputs import build_direct  # noqa: E402

METHODS = ["linear", "svd", "lego"]


def input_mb(paths: list[Path]) -> float:
    return sum((p / "adapter_model.safetensors").stat().st_size for p in paths) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="2,4,8,16,32")
    ap.add_argument("--layers", default="8,16,32")
    ap.add_argument("--base-layers", type=int, default=8, help="layer count of the adapter sweep")
    ap.add_argument("--base-adapters", type=int, default=4, help="adapter count of the layer sweep")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir", default="out/bench-scaling")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS-scaling.md")))
    args = ap.parse_args()
    methods = args.methods.split(",")

    def measure(layers: int, n: int) -> tuple[float, dict[str, dict]]:
        work = Path(args.workdir) / f"L{layers}-H{args.hidden}-n{n}-r{args.rank}"
        paths = build_direct(work, layers, n, args.rank, "", hidden=args.hidden, with_base=False)
        res = {}
        for m in methods:
            runs = [sb.run_child("ours", m, work, "cpu", args.threads) for _ in range(args.repeat)]
            res[m] = {"seconds": min(r["seconds"] for r in runs), "cpu_seconds": min(r["cpu_seconds"] for r in runs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
            print(f"L{layers} n{n} {m}: {res[m]['seconds']:.2f} s ({res[m]['cpu_seconds']:.2f} CPU s) "
                  f"{res[m]['peak_rss_mb']:.0f} MB", flush=True)
        return input_mb(paths), res

    by_n = {n: measure(args.base_layers, n) for n in map(int, args.adapters.split(","))}
    by_l = {L: (by_n[args.base_adapters] if L == args.base_layers and args.base_adapters in by_n
                else measure(L, args.base_adapters)) for L in map(int, args.layers.split(","))}
    lines = ["# Scaling with adapters and layers", "",
             f"Command: `python evals/bench/scaling_bench.py --adapters {args.adapters} --layers {args.layers} "
             f"--base-layers {args.base_layers} --base-adapters {args.base_adapters} --hidden {args.hidden} "
             f"--rank {args.rank} --repeat {args.repeat} --threads {args.threads} --methods {args.methods}`", "",
             f"Machine: {sb.machine()}, shared with other jobs (load average ≫ 2: wall times are noisy, CPU "
             f"seconds are the measure); OMP_NUM_THREADS={args.threads}.  In-process CPU seconds "
             f"of `merge()` (read + merge + fidelity + write; `time.process_time`), fastest of {args.repeat}; "
             "peak RSS of the process "
             f"(an idle interpreter with torch imported is ~230 MB).  Rank-{args.rank} fp32 adapters, hidden "
             f"{args.hidden}, 7 projections per layer; `lego` = `cluster -k 16`.", "",
             f"## Adapters ({args.base_layers} layers)", "",
             "| adapters | input MB | " + " | ".join(f"`{m}` CPU s | `{m}` CPU s/MB | `{m}` RSS MB" for m in methods) + " |",
             "|---|---|" + "---|---|---|" * len(methods)]
    for n, (mb, res) in by_n.items():
        lines.append(f"| {n} | {mb:.0f} | " + " | ".join(
            f"{res[m]['cpu_seconds']:.2f} | {res[m]['cpu_seconds'] / mb:.4f} | {res[m]['peak_rss_mb']:.0f}" for m in methods) + " |")
    lines += ["", f"## Layers ({args.base_adapters} adapters)", "",
              "| layers | input MB | " + " | ".join(f"`{m}` CPU s | `{m}` CPU s/MB | `{m}` RSS MB" for m in methods) + " |",
              "|---|---|" + "---|---|---|" * len(methods)]
    for L, (mb, res) in by_l.items():
        lines.append(f"| {L} | {mb:.0f} | " + " | ".join(
            f"{res[m]['cpu_seconds']:.2f} | {res[m]['cpu_seconds'] / mb:.4f} | {res[m]['peak_rss_mb']:.0f}" for m in methods) + " |")
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
