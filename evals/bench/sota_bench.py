"""Benchmark: the 2025 merges (core-space ties, knots_ties, tsv, iso_c, iso_cts) against our ``svd`` and
full-space ``ties``, whole process, at the TinyLlama-1.1B layout (4 × rank-16 bf16 adapters on all 7
projections of 22 layers; inputs from llama_inputs.build_direct).

Each method is one fresh ``python -m mergekit_lora.cli.main merge`` process timed from the outside
(/usr/bin/time: CPU seconds = user + system, wall, peak RSS), the fastest of ``--repeat`` runs.  Prints
a markdown table (and appends it to ``--results`` when given).  PEFT's ``ties_svd`` is not rerun here
(≈ 1,000 CPU s); its measurement on this layout is in RESULTS-e2e.md.

    OMP_NUM_THREADS=1 python evals/bench/sota_bench.py --repeat 2 --results evals/bench/RESULTS-sota.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llama_inputs import build_direct
from static_bench import fastest, machine, timed

METHODS = {  # label -> CLI arguments
    "svd": ["-m", "svd"],
    "ties (full, density 0.5)": ["-m", "ties", "--density", "0.5"],
    "ties -p space=core (density 0.5)": ["-m", "ties", "--density", "0.5", "-p", "space=core"],
    "dare_ties -p space=core (density 0.5)": ["-m", "dare_ties", "--density", "0.5", "-p", "space=core"],
    "knots_ties (density 1)": ["-m", "knots_ties"],
    "knots_ties (density 0.3)": ["-m", "knots_ties", "--density", "0.3"],
    "knots_dare_ties": ["-m", "knots_dare_ties"],
    "tsv": ["-m", "tsv"],
    "iso_c": ["-m", "iso_c"],
    "iso_cts": ["-m", "iso_cts"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/loramerge-bench")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated labels' first words (e.g. tsv,iso_c)")
    ap.add_argument("--results", default="")
    args = ap.parse_args()
    work = Path(args.workdir) / f"tinyllama-L22-n{args.adapters}-r{args.rank}"
    paths = build_direct(work, 22, args.adapters, args.rank, "tinyllama", with_base=False)
    w = ",".join([f"{1 / len(paths):.6g}"] * len(paths))
    only = {x for x in args.only.split(",") if x}
    rows = []
    for label, extra in METHODS.items():
        if only and label.split()[0] not in only:
            continue
        out = work / f"out-sota-{label.split()[0]}"
        cmd = [sys.executable, "-m", "mergekit_lora.cli.main", "merge", *map(str, paths), "-o", str(out),
               "--weights", w, "--force", *extra]
        r = fastest([timed(cmd, args.threads) for _ in range(args.repeat)])
        rows.append((label, r))
        print(f"{label}: {r['cpu_seconds']:.2f} CPU s, {r['seconds']:.2f} s wall, {r['peak_rss_mb']:.0f} MB", flush=True)
    base = next((r["cpu_seconds"] for lab, r in rows if lab == "svd"), None)
    cmdline = "OMP_NUM_THREADS=1 python evals/bench/sota_bench.py " + " ".join(sys.argv[1:])
    lines = [f"    {cmdline}", "", f"Machine: {machine()}; OMP_NUM_THREADS={args.threads}; "
             f"{args.adapters} adapters, rank {args.rank}, TinyLlama-1.1B layout (22 layers × 7 projections); "
             f"fastest of {args.repeat} whole-process runs.", "",
             "| method | CPU (s) | × our svd (CPU) | wall (s) | peak RSS (MB) |", "|---|---|---|---|---|"]
    for label, r in rows:
        ratio = f"{r['cpu_seconds'] / base:.2f}×" if base else ""
        lines.append(f"| `{label}` | {r['cpu_seconds']:.2f} | {ratio} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
