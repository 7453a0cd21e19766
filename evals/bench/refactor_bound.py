"""How the adaptive refactorisation's stopping bound was set: error vs bound, iteration by iteration.

For TIES matrices D of random rank-16 inputs (``refactor_bench.case``), run the subspace iteration of
:func:`algorithms.dense.refactor_batch` (start: the inputs' B columns + 8 Gaussian columns) for t = 1…5 and
print, after each iteration, the error ‖D̂_k − D_k‖/‖D_k‖ against the exact rank-k SVD, the bound
(σ̂_q/σ̂_k)^(2t) from the R of D·P = Q R, and their ratio.  ``dense.CONVERGENCE_BOUND`` is chosen so that
ratio × bound stays small wherever the error is above float32's floor (~1e-5).

    python evals/bench/refactor_bound.py
"""

from __future__ import annotations

import torch
from refactor_bench import case

CASES = [((2048, 2048), 8, 0.1), ((2048, 2048), 4, 0.05), ((2048, 2048), 4, 0.5), ((5632, 2048), 4, 0.5),
         ((256, 2048), 4, 0.5), ((2048, 5632), 8, 0.1), ((1024, 2816), 4, 0.1), ((384, 1056), 4, 0.5),
         ((2048, 2048), 16, 0.3)]


def main() -> None:
    torch.set_num_threads(1)
    k = 16
    for (m, n), n_in, density in CASES:
        D, start = case(m, n=n, n_in=n_in, density=density)
        D = D[0]
        U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
        Dk = (U[:, :k] * S[:k]) @ Vh[:k]
        g = torch.Generator().manual_seed(1)
        Q = torch.linalg.qr(torch.cat([start[0], D @ torch.randn(n, 8, generator=g)], 1)).Q
        cells = []
        for t in range(1, 6):
            Q, R = torch.linalg.qr(D @ torch.linalg.qr(D.T @ Q).Q)
            s = torch.linalg.svdvals(R)
            Us, s2, Vs = torch.linalg.svd(Q.T @ D, full_matrices=False)
            err = float((((Q @ Us[:, :k]) * s2[:k]) @ Vs[:k]).double().sub(Dk).norm() / Dk.norm())
            bound = float((s[-1] / s[k - 1]) ** (2 * t))
            cells.append(f"t{t}: {err:.1e} / {bound:.1e} = {err / bound:.2f}")
        print(f"| {m} × {n} | {n_in} | {density:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
