"""Lloyd's algorithm in torch, batched over M point sets ([M, N, D] tensors), on the points' device."""

from __future__ import annotations

import torch

from .seeding import sq_dist


def _centres(X: torch.Tensor, labels: torch.Tensor, k: int, old: torch.Tensor) -> torch.Tensor:
    """Member means per cluster; an empty cluster keeps its old centre."""
    onehot = torch.nn.functional.one_hot(labels, k).to(X.dtype)  # [M, N, k]
    sums = torch.bmm(onehot.transpose(1, 2), X)
    counts = onehot.sum(1)  # [M, k]
    return torch.where(counts[:, :, None] > 0, sums / counts.clamp_min(1)[:, :, None], old)


def _reseed_empty(X: torch.Tensor, d: torch.Tensor, labels: torch.Tensor, C: torch.Tensor) -> None:
    """Deterministic re-seeding: an empty cluster takes the point farthest from its centre (lowest index on
    ties), one distinct point per empty cluster; nothing happens when every point sits on its centre."""
    k = C.shape[1]
    counts = torch.nn.functional.one_hot(labels, k).sum(1)
    for m, j in (counts == 0).nonzero().tolist():
        own = d[m].gather(1, labels[m][:, None])[:, 0]
        p = int(torch.argmax(own))
        if float(own[p]) <= 0:
            continue
        C[m, j] = X[m, p]
        labels[m, p] = j
        d[m, p] = 0


def lloyd(X: torch.Tensor, C: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [M, N], inertia [M]) from seeds C [M, k, D]; stops when no label changes in any set."""
    C = C.clone()
    k = C.shape[1]
    prev: torch.Tensor | None = None
    for _ in range(max_iter):
        d = sq_dist(X, C)
        labels = d.argmin(-1)
        _reseed_empty(X, d, labels, C)
        C = _centres(X, labels, k, C)
        if prev is not None and torch.equal(prev, labels):
            break
        prev = labels
    d = sq_dist(X, C)
    labels = d.argmin(-1)
    return labels, d.gather(2, labels[:, :, None])[:, :, 0].sum(1)
