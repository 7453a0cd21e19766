"""Seeded k-means++ seeding, batched over point sets, shared by every backend.

Drawing the seeds here (not inside each library) is what makes the backends comparable and every
result reproducible: the same generator state gives the same seeds on CPU and CUDA.  Seeding works
on the Gram matrix K = X Xᵀ ([M, N, N]): rank-unit pools are few points (N ~ 100) in a high
dimension (D ~ 10⁴), so one O(N²D) product replaces every later O(ND) pass over the points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def gram(X: torch.Tensor) -> torch.Tensor:
    """K [M, N, N] = X Xᵀ per set."""
    return torch.bmm(X, X.transpose(1, 2))


def kmeans_pp(K: torch.Tensor, k: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Seed indices [M, k] (CPU): the first uniformly, each next with probability ∝ D(x)².

    When every remaining point coincides with a chosen seed (fewer distinct points than k), the next
    seed is drawn uniformly; Lloyd then leaves that cluster empty.
    """
    M, N, _ = K.shape
    kd = torch.diagonal(K, dim1=1, dim2=2)
    rows = torch.arange(M, device=K.device)
    idx = torch.empty(M, k, dtype=torch.long)
    idx[:, 0] = torch.stack([torch.randint(N, (1,), generator=g)[0] for g in generators])

    def dist_to(p: torch.Tensor) -> torch.Tensor:  # [M, N] squared distance to point p[m] of each set
        p = p.to(K.device)
        return (kd - 2 * K[rows, :, p] + kd[rows, p][:, None]).clamp_min(0)

    d2 = dist_to(idx[:, 0])
    for j in range(1, k):
        w = d2.double().cpu()
        picks = []
        for m, g in enumerate(generators):
            if float(w[m].sum()) > 0:
                picks.append(torch.multinomial(w[m], 1, generator=g)[0])
            else:
                picks.append(torch.randint(N, (1,), generator=g)[0])
        idx[:, j] = torch.stack(picks)
        d2 = torch.minimum(d2, dist_to(idx[:, j]))
    return idx
