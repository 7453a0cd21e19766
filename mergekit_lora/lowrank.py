"""Exact SVD of ΔW = B A in factor space: QR of B and of Aᵀ, SVD of the small r×r core.

ΔW = Q_b R_b R_aᵀ Q_aᵀ, so the singular values of ΔW are those of the core R_b R_aᵀ; the cost is
O((d_out + d_in) r²) instead of a dense O(d_out d_in min(d_out, d_in)) SVD.
"""

from __future__ import annotations

import torch

from .determinism import one_thread
from .units import RankUnits


def factor_svd(u: RankUnits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [d_out, m], S [m], Vh [m, d_in]) with ΔW = U diag(S) Vh, computed in float64."""
    B = u.B.double()
    A = u.A.double()
    with one_thread(B.device):  # LAPACK bits depend on the thread count (mergekit_lora.determinism)
        qb, rb = torch.linalg.qr(B, mode="reduced")
        qa, ra = torch.linalg.qr(A.T, mode="reduced")
        core = rb @ ra.T
        uc, s, vhc = torch.linalg.svd(core, full_matrices=False)
    return qb @ uc, s, vhc @ qa.T


def singular_values(u: RankUnits) -> torch.Tensor:
    """Singular values of ΔW (float64), from the core only."""
    B = u.B.double()
    A = u.A.double()
    with one_thread(B.device):
        rb = torch.linalg.qr(B, mode="r")[1]
        ra = torch.linalg.qr(A.T, mode="r")[1]
        return torch.linalg.svdvals(rb @ ra.T)


def truncate(u: RankUnits, k: int) -> RankUnits:
    """The best rank-k approximation of ΔW (Eckart–Young), as k balanced units b_j = u_j √σ_j, a_j = √σ_j v_j.

    Units of the result mix inputs, so their ``source`` is -1.
    """
    U, S, Vh = factor_svd(u)
    k = min(k, S.shape[0])
    root = S[:k].sqrt()
    B = (U[:, :k] * root[None, :]).to(u.B.dtype)
    A = (root[:, None] * Vh[:k]).to(u.A.dtype)
    return u.with_factors(A, B, torch.full((k,), -1, dtype=torch.long))
