"""Where a `cluster` (LoRA-LEGO) merge spends its CPU time, per stage (not a test).

Wraps the stage functions (reading, pool + Grams, k-means, cluster statistics, centroids, reweighting,
output assembly) with CPU-time counters (``time.process_time``: the process's own CPU seconds, so other
load on a shared machine does not count) and runs ``merge`` in one process; each stage's time excludes
the stages it calls.  The fastest of ``--repeat`` warm runs is reported.  ``--baseline DIR`` runs another
checkout's code instead (``git archive <commit> | tar -x -C DIR``).

Usage: .venv/bin/python evals/bench/lego_stages.py --layers 32 --threads 1 --repeat 3
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from synthetic import make_adapters


def use_checkout(base: str) -> None:
    """Import the package from another checkout (its folders mapped before the first import)."""
    folders = {"mergekit_lora": "mergekit_lora"}  # the whole package is one folder

    class BaseFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):  # noqa: ARG004 - the finder protocol
            if name in folders:
                d = f"{base}/{folders[name]}"
                return importlib.util.spec_from_file_location(name, f"{d}/__init__.py", submodule_search_locations=[d])
            return None

    sys.meta_path.insert(0, BaseFinder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lego-bench"))
    ap.add_argument("--baseline", default="")
    a = ap.parse_args()
    if a.baseline:
        use_checkout(a.baseline)
    from mergekit_lora import adapter, merge, threads
    from mergekit_lora.algorithms.lego import algorithm as alg

    acc: dict[str, float] = defaultdict(float)  # process CPU s while the main thread is in a stage
    wall: dict[str, float] = defaultdict(float)  # the main thread's wall s in a stage
    ahead: dict[str, float] = defaultdict(float)  # wall s of stages run on the read-ahead thread
    stack: list[str] = []

    def wrap(owner, name: str, label: str) -> None:
        f = getattr(owner, name)

        @functools.wraps(f)
        def timed(*args, **kw):
            if threading.current_thread() is not threading.main_thread():  # read ahead: counted apart
                t, c = time.perf_counter(), time.thread_time()
                try:
                    return f(*args, **kw)
                finally:
                    ahead[label] += time.perf_counter() - t
                    ahead[label + " (its CPU s)"] += time.thread_time() - c
            c, t = time.process_time(), time.perf_counter()
            stack.append(label)
            try:
                return f(*args, **kw)
            finally:
                stack.pop()
                d, dw = time.process_time() - c, time.perf_counter() - t
                acc[label] += d
                wall[label] += dw
                if stack:
                    acc[stack[-1]] -= d
                    wall[stack[-1]] -= dw

        setattr(owner, name, timed)

    blocked = threads.blocked_matmul

    def timed_products(X, Y, budget, by="rows"):  # the budget's products: the two N×N Grams and the centroid factors
        c, t = time.process_time(), time.perf_counter()
        stack.append("products (N×N Grams, centroid factors)")
        try:
            return blocked(X, Y, budget, by)
        finally:
            stack.pop()
            d, dw = time.process_time() - c, time.perf_counter() - t
            acc["products (N×N Grams, centroid factors)"] += d
            wall["products (N×N Grams, centroid factors)"] += dw
            if stack:
                acc[stack[-1]] -= d
                wall[stack[-1]] -= dw

    threads.blocked_matmul = timed_products
    wrap(adapter.Adapter, "units", "read inputs (page cache → tensors, finite check)")
    if hasattr(alg.Lego, "load_batch"):  # reads into the pool (2026-12: read_pools)
        wrap(alg.Lego, "load_batch", "read inputs into the pool (page cache → pool, checks; since lego4 also the "
                                     "pool pass: weights, sort keys, max-abs norms; B-Grams while a batch is merged)")
    wrap(alg, "build_pools", "pool: copy, sort keys, max-abs norms (unless made while reading), order, sorted Grams")
    wrap(alg, "kmeans_gram", "k-means (seeding, Lloyd, signs)")
    wrap(alg, "cluster_stats", "cluster statistics (centroid Grams)")
    wrap(alg, "centroids", "centroid factors (k·N·d products)")
    wrap(alg, "option_scales", "reweighting options")
    wrap(alg.Lego, "_assemble", "output canonical form, sources")
    wrap(alg.Lego, "merge_batch", "merge_batch (rest)")
    paths = make_adapters(a.workdir / f"L{a.layers}-h4096", a.adapters, a.layers, 4096, 11008, a.rank)

    def run() -> None:
        merge(paths, "lego", a.workdir / "out-stages", params={"k": a.k, "backend": "torch"}, device="cpu",
              force=True, threads=a.threads)

    run()  # warm: imports, page cache
    best = None
    for _ in range(a.repeat):
        acc.clear()
        wall.clear()
        ahead.clear()
        c, t = time.process_time(), time.perf_counter()
        run()
        total, wall_s = time.process_time() - c, time.perf_counter() - t
        if best is None or total < best[0]:
            best = (total, wall_s, dict(acc), dict(wall), dict(ahead))
    assert best is not None
    total, wall_s, stages, walls, aheads = best
    print("| stage | CPU s | wall s (main thread) | share (CPU) |\n|---|---|---|---|")
    for k, v in sorted(stages.items(), key=lambda x: -x[1]):
        print(f"| {k} | {v:.2f} | {walls.get(k, 0.0):.2f} | {v / total:.0%} |")
    rest = total - sum(stages.values())
    print(f"| plan, writer, driver | {rest:.2f} | {wall_s - sum(walls.values()):.2f} | {rest / total:.0%} |")
    print(f"| **total** | **{total:.2f}** | **{wall_s:.2f}** | |")
    for k, v in aheads.items():
        print(f"| (read-ahead thread) {k} | | {v:.2f} | |")
    print(f"\nCommand: `{' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{' / '.join(f'{x:.2f}' for x in __import__('os').getloadavg())}).")


if __name__ == "__main__":
    main()
