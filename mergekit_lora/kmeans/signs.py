"""The sign step of sign-invariant k-means: a point may enter its cluster as x or −x.

Given signed points (Gram ``Ks``) and their labels, the centres are the cluster means (weights W);
a point flips when −x is closer to some centre than x is to the nearest one, by more than a relative
1e-9 (no flip-flopping on ties).  Each flip lowers the k-means objective and Lloyd never raises it,
so alternating the two terminates.
"""

from __future__ import annotations

import torch


def flip_step(Ks: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flip [M, N] bool, centre weights W [M, N, k]) for the labelled signed points."""
    H = torch.nn.functional.one_hot(labels, k).to(Ks.dtype)
    W = H / H.sum(1).clamp_min(1)[:, None, :]
    kd = torch.diagonal(Ks, dim1=1, dim2=2)
    KW = torch.bmm(Ks, W)
    cc = (W * KW).sum(1)
    keep = (kd[:, :, None] - 2 * KW + cc[:, None, :]).clamp_min(0).min(-1).values  # ‖x − c‖², nearest c
    flipped = (kd[:, :, None] + 2 * KW + cc[:, None, :]).clamp_min(0).min(-1).values  # ‖−x − c‖²
    scale = kd + cc.max(-1, keepdim=True).values
    return flipped < keep - 1e-9 * scale, W
