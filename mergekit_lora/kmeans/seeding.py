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


def embed(K: torch.Tensor) -> torch.Tensor:
    """Points Y [M, N, N] with Y Yᵀ = K (eigendecomposition, float64): the same distances as the original
    points in at most N dimensions, for backends that need coordinates when only the Gram is known."""
    evals, evecs = torch.linalg.eigh(K.double())
    return evecs * evals.clamp_min(0).sqrt()[:, None, :]


def kmeans_pp(K: torch.Tensor, k: int, generators: Sequence[torch.Generator], *,
              sign_invariant: bool = False) -> torch.Tensor:
    """Seed indices [M, k] (CPU): the first uniformly, each next with probability ∝ D(x)².

    ``sign_invariant``: x and −x count as the same point (D uses min(‖x − s‖, ‖x + s‖)).  When every
    remaining point coincides with a chosen seed (fewer distinct points than k), the next seed is drawn
    uniformly; Lloyd then leaves that cluster empty.
    """
    M, N, _ = K.shape
    kd = torch.diagonal(K, dim1=1, dim2=2)
    rows = torch.arange(M, device=K.device)
    # every random number of a set comes from its own generator (batch-independent), drawn up front;
    # each draw is an inverse-CDF pick, so the k steps run batched over the sets
    u = torch.stack([torch.rand(k, generator=g, dtype=torch.float64) for g in generators])  # [M, k]
    idx = torch.empty(M, k, dtype=torch.long)
    idx[:, 0] = (u[:, 0] * N).long().clamp_max(N - 1)

    def dist_to(p: torch.Tensor) -> torch.Tensor:  # [M, N] squared distance to point p[m] of each set
        p = p.to(K.device)
        cross = K[rows, :, p]
        if sign_invariant:
            cross = cross.abs()
        return (kd - 2 * cross + kd[rows, p][:, None]).clamp_min(0)

    d2 = dist_to(idx[:, 0])
    for j in range(1, k):
        cdf = d2.double().cpu().cumsum(1)
        total = cdf[:, -1]
        drawn = torch.searchsorted(cdf, (u[:, j] * total)[:, None], right=True)[:, 0].clamp_max(N - 1)
        uniform = (u[:, j] * N).long().clamp_max(N - 1)  # every point already a seed: any point
        idx[:, j] = torch.where(total > 0, drawn, uniform)
        d2 = torch.minimum(d2, dist_to(idx[:, j]))
    return idx
