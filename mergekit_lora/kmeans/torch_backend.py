"""Lloyd's algorithm in torch, batched over M point sets, on the Gram matrix K = X Xᵀ.

Each centre is kept as weights over the points (c_j = Σ_i W_ij x_i), so ‖x_i − c_j‖² =
K_ii − 2 (K W)_ij + (Wᵀ K W)_jj: exactly Lloyd in the original space, at O(N² k) per iteration
instead of O(N D k) — the pools are ~100 points in ~10⁴ dimensions.
"""

from __future__ import annotations

import torch


def init_weights(init: torch.Tensor, N: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Centre weights W [M, N, k] from seed indices [M, k] (one point per centre) or W itself."""
    if init.ndim == 3:
        return init.to(device=device, dtype=dtype)
    return torch.nn.functional.one_hot(init.to(device), N).to(dtype).transpose(1, 2).contiguous()


def initial_centres(X: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Centre coordinates [M, k, D] for backends that take them: Wᵀ X."""
    W = init_weights(init, X.shape[1], X.dtype, X.device)
    return torch.bmm(W.transpose(1, 2), X).detach()


def sq_dist(K: torch.Tensor, kd: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """[M, N, k] squared distances of the points to the centres W."""
    KW = torch.bmm(K, W)
    cc = (W * KW).sum(1)  # [M, k]
    return (kd[:, :, None] - 2 * KW + cc[:, None, :]).clamp_min(0)


def _reseed_empty(d: torch.Tensor, labels: torch.Tensor, W: torch.Tensor) -> None:
    """Deterministic re-seeding: an empty cluster takes the point farthest from its centre (lowest index on
    ties), one distinct point per empty cluster; nothing happens when every point sits on its centre."""
    k = W.shape[2]
    counts = torch.nn.functional.one_hot(labels, k).sum(1)
    if bool((counts > 0).all()):
        return
    for m, j in (counts == 0).nonzero().tolist():
        own = d[m].gather(1, labels[m][:, None])[:, 0]
        p = int(torch.argmax(own))
        if float(own[p]) <= 0:
            continue
        W[m, :, j] = 0
        W[m, p, j] = 1
        labels[m, p] = j
        d[m, p] = 0


def lloyd(X: torch.Tensor | None, K: torch.Tensor, init: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels [M, N], inertia [M]) from seed indices [M, k] or centre weights [M, N, k]; stops when no
    label changes in any set.  Works on K alone (``X`` is not needed)."""
    M, N, _ = K.shape
    kd = torch.diagonal(K, dim1=1, dim2=2)
    W = init_weights(init, N, K.dtype, K.device)
    k = W.shape[2]
    prev: torch.Tensor | None = None
    for _ in range(max_iter):
        d = sq_dist(K, kd, W)
        labels = d.argmin(-1)
        _reseed_empty(d, labels, W)
        H = torch.nn.functional.one_hot(labels, k).to(K.dtype)
        n = H.sum(1)  # [M, k]
        W = torch.where(n[:, None, :] > 0, H / n.clamp_min(1)[:, None, :], W)
        if prev is not None and torch.equal(prev, labels):
            break
        prev = labels
    d = sq_dist(K, kd, W)
    labels = d.argmin(-1)
    return labels, d.gather(2, labels[:, :, None])[:, :, 0].sum(1)
