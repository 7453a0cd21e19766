"""`eval compare` re-run with every score cached: what each cache layer saves (issue 25).

    LORAMERGE_CACHE=/tmp/cache python evals/bench/compare_rerun_bench.py CONFIG.yaml --repeat 3

One warm-up run fills the score, fidelity and merge caches; then three variants alternate in this process,
each a whole ``run_compare`` (model load, merges, cached scores, report): ``fidelity recomputed``
(``cached_fidelity`` with its cache off and every merge redone: the code before issue 25 §4),
``merges redone`` (the merge records ignored: every method merges again, its fidelity and scores read
back: the code before the merge records), ``as shipped`` (a merge whose record and scores are cached is
not redone).  Prints the fastest wall and CPU seconds of each, the merge and fidelity seconds inside the
runs and the load average, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mergekit_lora.evals.compare as compare
from mergekit_lora.evals.score_cache import cached_fidelity, lookup_merge


def load() -> str:
    return " / ".join(open("/proc/loadavg").read().split()[:3])


def one(config, root: Path, out: Path) -> tuple[float, float, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    rep = compare.run_compare(config, root, out, force=True, log=lambda m: None)
    fid = sum(r.get("fidelity_seconds", 0.0) for r in rep["rows"])
    merges = sum(r.get("merge_seconds", 0.0) for r in rep["rows"])
    return time.perf_counter() - w0, time.process_time() - c0, merges, fid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    config, root = compare.load_config(args.config)
    assert config.cache, "the config must use the cache (cache: true)"
    no_fidelity_cache = lambda *a, **kw: cached_fidelity(*a, **{**kw, "enabled": False})  # noqa: E731
    variants = {"fidelity recomputed": (no_fidelity_cache, lambda key: None),
                "merges redone": (cached_fidelity, lambda key: None),
                "as shipped": (cached_fidelity, lookup_merge)}
    before_load = load()
    with tempfile.TemporaryDirectory() as tmp:
        one(config, root, Path(tmp) / "warm")  # fills the caches
        best: dict[str, tuple[float, float, float]] = {}
        for _ in range(args.repeat):
            for name, (fid, merges) in variants.items():
                compare.cached_fidelity, compare.lookup_merge = fid, merges
                got = one(config, root, Path(tmp) / name.replace(" ", "-"))
                if name not in best or got[0] < best[name][0]:
                    best[name] = got
        compare.cached_fidelity, compare.lookup_merge = cached_fidelity, lookup_merge
    print(f"config {args.config}, fastest of {args.repeat} alternating runs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '-')}; load average {before_load} before, {load()} after\n")
    print("| re-run, every score cached | wall s | CPU s | merges s (wall) | fidelity s (wall) |\n"
          "|---|---:|---:|---:|---:|")
    for name, (w, c, m, f) in best.items():
        print(f"| {name} | {w:.2f} | {c:.2f} | {m:.2f} | {f:.2f} |")


if __name__ == "__main__":
    main()
