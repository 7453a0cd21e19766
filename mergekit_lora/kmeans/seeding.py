"""Seeded k-means++ seeding, batched over point sets, shared by every backend.

Drawing the seeds here (not inside each library) is what makes the backends comparable and every
result reproducible: the same generator state gives the same seeds on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sq_dist(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Squared distances [M, N, k] between points X [M, N, D] and centres C [M, k, D] (clamped at 0)."""
    d = (X * X).sum(-1)[:, :, None] - 2 * torch.bmm(X, C.transpose(1, 2)) + (C * C).sum(-1)[:, None, :]
    return d.clamp_min_(0)


def kmeans_pp(X: torch.Tensor, k: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """k seeds per set [M, k, D]: the first uniformly, each next with probability ∝ D(x)².

    When every remaining point coincides with a chosen seed (fewer distinct points than k), the next
    seed is drawn uniformly; Lloyd then leaves that cluster empty.
    """
    M, N, _ = X.shape
    rows = torch.arange(M, device=X.device)
    idx = torch.empty(M, k, dtype=torch.long)
    idx[:, 0] = torch.stack([torch.randint(N, (1,), generator=g)[0] for g in generators])
    d2 = sq_dist(X, X[rows, idx[:, 0].to(X.device)][:, None, :])[:, :, 0]
    for j in range(1, k):
        w = d2.double().cpu()
        picks = []
        for m, g in enumerate(generators):
            if float(w[m].sum()) > 0:
                picks.append(torch.multinomial(w[m], 1, generator=g)[0])
            else:
                picks.append(torch.randint(N, (1,), generator=g)[0])
        idx[:, j] = torch.stack(picks)
        d_new = sq_dist(X, X[rows, idx[:, j].to(X.device)][:, None, :])[:, :, 0]
        d2 = torch.minimum(d2, d_new)
    return X[rows[:, None], idx.to(X.device)]
