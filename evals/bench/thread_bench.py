"""Benchmark: the thread policy under contention vs torch's default and fixed 1 / 2 threads.

A CPU-burning background process (``while True: pass``) runs for the whole benchmark, as a training
job or another user would.  Each merge runs in its own subprocess (``mergekit_lora.pipeline.merge``,
in-process wall time: read + merge + fidelity + write) in four modes, interleaved, fastest of
``--repeat``:

- ``policy``: the default — :mod:`mergekit_lora.threads` (1 thread for small work, the budget for
  big GEMMs and chunk pools);
- ``torch``: ``LORAMERGE_THREAD_POLICY=off``, torch's own default (one thread per core);
- ``fixed1`` / ``fixed2``: policy off, ``torch.set_num_threads(1 / 2)``.

The goal: ``policy`` within 10 % of the best fixed thread count for every method.

    python evals/bench/thread_bench.py --layers 4 --hidden 1024 --adapters 4 --repeat 3
    python evals/bench/thread_bench.py --layers 8 --hidden 4096 --intermediate 11008 --adapters 8 --methods lego

``--intermediate`` builds the adapters with :func:`synthetic.make_adapters` (Llama-7B-like sizes, as
``lego_bench.py``); ``--burners`` sets how many CPU-burning processes run (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

METHODS = {"linear": {}, "svd": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
           "magnitude_prune": {"density": 0.5}, "lego": {"k": 16}}
MODES = ["policy", "torch", "fixed1", "fixed2"]


def child(args: argparse.Namespace) -> None:
    import torch

    if args.mode != "policy":
        os.environ["LORAMERGE_THREAD_POLICY"] = "off"
        if args.mode.startswith("fixed"):
            torch.set_num_threads(int(args.mode[5:]))
    from mergekit_lora.pipeline import merge

    paths = sorted(str(p) for p in Path(args.work).glob("adapter*"))
    t0 = time.perf_counter()
    merge(paths, args.method, Path(args.work) / f"out-{args.method}-{args.mode}", weights=[1 / len(paths)] * len(paths),
          params=METHODS[args.method], device="cpu", force=True)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def run(method: str, mode: str, work: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, __file__, "--child", "--method", method, "--mode", mode, "--work", str(work)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=0, help="MLP size (default: static_bench's 2.75 × hidden)")
    ap.add_argument("--burners", type=int, default=1, help="CPU-burning background processes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-burner", action="store_true", help="measure without the CPU-burning process")
    ap.add_argument("--workdir", default="out/bench-threads")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS-threads.md")))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--method", default="linear")
    ap.add_argument("--mode", default="policy")
    ap.add_argument("--work", default="")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from llama_inputs import build
    from static_bench import machine

    work = Path(args.workdir) / f"L{args.layers}-H{args.hidden}-I{args.intermediate}-n{args.adapters}-r{args.rank}"
    if args.intermediate:
        from synthetic import make_adapters

        make_adapters(work, args.adapters, args.layers, args.hidden, args.intermediate, args.rank)
    else:
        build(work, args.layers, args.hidden, args.adapters, args.rank, with_base=False)
    n_burn = 0 if args.no_burner else args.burners
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n_burn)]
    load_before = os.getloadavg()
    times: dict[str, dict[str, float]] = {}
    try:
        for m in args.methods.split(","):
            times[m] = {mode: float("inf") for mode in MODES}
            for _ in range(args.repeat):
                for mode in MODES:
                    times[m][mode] = min(times[m][mode], run(m, mode, work))
            print(m, {k: round(v, 3) for k, v in times[m].items()}, flush=True)
    finally:
        load_after = os.getloadavg()
        for burner in burners:
            burner.kill()
            burner.wait()
    lines = ["# Thread policy under contention", "",
             f"Command: `python evals/bench/thread_bench.py --layers {args.layers} --hidden {args.hidden} "
             f"--adapters {args.adapters} --rank {args.rank} --repeat {args.repeat} --methods {args.methods}"
             + (f" --intermediate {args.intermediate}" if args.intermediate else "")
             + (f" --burners {args.burners}" if args.burners != 1 and not args.no_burner else "")
             + (" --no-burner" if args.no_burner else "") + "`", "",
             f"Machine: {machine()}; shared with other jobs"
             + ("" if args.no_burner else f"; plus {n_burn} CPU-burning process(es) (`while True: pass`) for the whole run")
             + "; load average (1/5/15 min) " + " / ".join(f"{x:.2f}" for x in load_before) + " at the start, "
             + " / ".join(f"{x:.2f}" for x in load_after) + " at the end"
             + f".  Wall seconds of `merge()` in a fresh process, fastest of {args.repeat} interleaved runs.  "
             f"Inputs: {args.adapters} rank-{args.rank} adapters, {args.layers} layers, hidden {args.hidden}"
             + (f", intermediate {args.intermediate}" if args.intermediate else "") + ", "
             "7 projections.", "",
             "| method | policy (s) | torch default (s) | 1 thread (s) | 2 threads (s) | policy / best fixed | ≤ 1.10 |",
             "|---|---|---|---|---|---|---|"]
    for m, t in times.items():
        best = min(t["fixed1"], t["fixed2"])
        ratio = t["policy"] / best
        lines.append(f"| `{m}` | {t['policy']:.2f} | {t['torch']:.2f} | {t['fixed1']:.2f} | {t['fixed2']:.2f} | "
                     f"{ratio:.2f} | {'yes' if ratio <= 1.10 else '**no**'} |")
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
