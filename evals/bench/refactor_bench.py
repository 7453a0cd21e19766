"""Benchmark: exact SVD vs the seeded subspace iteration for the dense methods' refactorisation.

For square-ish TIES matrices D (d_out = m, d_in = 2.75·m, 4 random rank-16 inputs, density 0.5 — the
static benchmark's adapters, whose spectrum is flat above the 64 input directions: the hard case)
it reports the CPU time of ``torch.linalg.svd`` and of :func:`algorithms.dense.refactor_batch`'s
iteration at several ``niter`` (and ``auto``, the adaptive default), and the iteration's error ‖D̂_k − D_k‖/‖D_k‖ against the exact
rank-k truncation.  Times are process CPU time (1 thread), fastest of ``--repeat``: robust on a
shared machine.

    python evals/bench/refactor_bench.py --sizes 128,192,256,384,512,1024 --repeat 3
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import mergekit_lora.algorithms.dense as dense_mod  # EXACT_MIN_DIM is lowered to force the iteration
from mergekit_lora.algorithms.dense import DenseParams, refactor_batch
from mergekit_lora.algorithms.ties import TiesParams, ties_dense
from mergekit_lora.registry import ModuleContext
from mergekit_lora.threads import ThreadBudget
from mergekit_lora.units import RankUnits

ONE = ThreadBudget(1)  # as a one-thread merge runs: blocked products, views read in place


def case(m: int, n_in: int = 4, r: int = 16, seed: int = 0, n: int | None = None,
         density: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = n or int(m * 2.75)
    units = [RankUnits.from_factors(torch.randn(r, n, generator=g) * 0.02, torch.randn(m, r, generator=g) * 0.02,
                                    source=i) for i in range(n_in)]
    D = ties_dense([units], [1.0 / n_in] * n_in, TiesParams(density=density),
                   [ModuleContext("m", 0, torch.device("cpu"), ONE)], torch.float32)
    start = torch.cat([u.B for u in units], 1)[None]
    return D, start


def cpu_time(args: tuple, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        refactor_batch(*args, ONE)
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,192,256,384,512,1024")
    ap.add_argument("--shapes", default="", help="m×n shapes instead of --sizes, e.g. 1024x1024,2816x1024")
    ap.add_argument("--cases", default="", help="m×n:inputs:density cases instead of shapes, e.g. 2048x2048:8:0.1")
    ap.add_argument("--niters", default="1,2,3,4", help="fixed counts and/or 'auto' (the default: adaptive)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=4, help="rank-16 inputs of the TIES case")
    ap.add_argument("--density", type=float, default=0.5, help="TIES density of the case")
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS-refactor.md")))
    args = ap.parse_args()
    torch.set_num_threads(1)
    k = 16
    niters = [None if x == "auto" else int(x) for x in args.niters.split(",")]
    if args.cases:
        cases = [(*(int(v) for v in c.split(":")[0].split("x")), int(c.split(":")[1]), float(c.split(":")[2]))
                 for c in args.cases.split(",")]
        what = f"--cases {args.cases}"
    else:
        shapes = ([tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")] if args.shapes
                  else [(int(x), int(int(x) * 2.75)) for x in args.sizes.split(",")])
        cases = [(m, n, args.inputs, args.density) for m, n in shapes]
        what = (f"--shapes {args.shapes}" if args.shapes else f"--sizes {args.sizes}") + \
            f" --inputs {args.inputs} --density {args.density}"
    name = {None: "auto"}
    lines = ["# Refactorisation: exact SVD vs subspace iteration (dense methods)", "",
             f"Command: `python evals/bench/refactor_bench.py {what} --niters {args.niters} --repeat {args.repeat}`", "",
             f"Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch thread, "
             f"torch {torch.__version__}; CPU seconds, fastest of {args.repeat}.  D: TIES of random rank-16 inputs "
             "(weights 1/n), d_out = m, d_in = n, k = 16; iteration: inputs' B columns + 8 Gaussian columns; "
             "auto: per module until (σ̂_q/σ̂_k)^(2t) ≤ 2e-3 (iterations used in brackets).", "",
             "| m × n | inputs | density | exact SVD (s) | "
             + " | ".join(f"niter={name.get(i, i)} (s) | niter={name.get(i, i)} rel. err" for i in niters) + " |",
             "|---|---|---|---|" + "---|---|" * len(niters)]
    for m, n, n_in, density in cases:
        D, start = case(m, n=n, n_in=n_in, density=density)
        gens = [torch.Generator().manual_seed(1)]
        exact = DenseParams(density=1.0, exact_svd=True)
        Be, Ae, _, _, _ = refactor_batch(D, k, exact, start, gens, ONE)
        Dk = (Be[0] @ Ae[0]).double()
        row = [f"{m} × {D.shape[2]}", str(n_in), f"{density:g}", f"{cpu_time((D, k, exact, start, gens), args.repeat):.4f}"]
        for it in niters:
            p = DenseParams(density=1.0, niter=it)
            old, dense_mod.EXACT_MIN_DIM = dense_mod.EXACT_MIN_DIM, 0
            try:
                t = cpu_time((D, k, p, start, gens), args.repeat)
                B, A, _, _, used = refactor_batch(D, k, p, start, gens, ONE)
            finally:
                dense_mod.EXACT_MIN_DIM = old
            err = float(((B[0] @ A[0]).double() - Dk).norm() / Dk.norm())
            row += [f"{t:.4f}", f"{err:.1e}" + (f" [{used[0]}]" if it is None else "")]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    Path(args.results).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
