"""`eval compare` re-run with every score cached: fidelity recomputed (before issue 25 §4) vs read back.

    LORAMERGE_CACHE=/tmp/cache python evals/bench/compare_rerun_bench.py CONFIG.yaml --repeat 3

One warm-up run fills the score and fidelity caches; then the two variants alternate in this process
(``before``: ``cached_fidelity`` with its cache off, i.e. ``fidelity_report`` on every merge as the code
did before; ``after``: as shipped), each a whole ``run_compare`` (model load, merges, cached scores,
report).  Prints the fastest wall and CPU seconds of each, their ratio, the fidelity seconds inside the
runs and the load average, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mergekit_lora.evals.compare as compare
from mergekit_lora.evals.score_cache import cached_fidelity


def load() -> str:
    return " / ".join(open("/proc/loadavg").read().split()[:3])


def one(config, root: Path, out: Path) -> tuple[float, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    rep = compare.run_compare(config, root, out, force=True, log=lambda m: None)
    fid = sum(r.get("fidelity_seconds", 0.0) for r in rep["rows"])
    return time.perf_counter() - w0, time.process_time() - c0, fid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    config, root = compare.load_config(args.config)
    assert config.cache, "the config must use the cache (cache: true)"
    variants = {"before": lambda *a, **kw: cached_fidelity(*a, **{**kw, "enabled": False}),
                "after": cached_fidelity}
    before_load = load()
    with tempfile.TemporaryDirectory() as tmp:
        one(config, root, Path(tmp) / "warm")  # fills the caches
        best: dict[str, tuple[float, float, float]] = {}
        for _ in range(args.repeat):
            for name, fn in variants.items():
                compare.cached_fidelity = fn
                got = one(config, root, Path(tmp) / name)
                if name not in best or got[0] < best[name][0]:
                    best[name] = got
        compare.cached_fidelity = cached_fidelity
    print(f"config {args.config}, fastest of {args.repeat} alternating runs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}; load average {before_load} before, {load()} after\n")
    print("| re-run, every score cached | wall s | CPU s | fidelity s (wall) |\n|---|---:|---:|---:|")
    for name, (w, c, f) in best.items():
        print(f"| {name} | {w:.2f} | {c:.2f} | {f:.2f} |")
    print(f"| ratio before/after | {best['before'][0] / best['after'][0]:.2f}× | "
          f"{best['before'][1] / best['after'][1]:.2f}× | |")


if __name__ == "__main__":
    main()
