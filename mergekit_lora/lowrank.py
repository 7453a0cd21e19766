"""Exact SVD of ΔW = B A in factor space: QR of B and of Aᵀ, SVD of the small r×r core.

ΔW = Q_b R_b R_aᵀ Q_aᵀ, so the singular values of ΔW are those of the core R_b R_aᵀ; the cost is
O((d_out + d_in) r²) instead of a dense O(d_out d_in min(d_out, d_in)) SVD.

Precision: :func:`truncate` works in the inputs' precision (float32 for fp32/fp16/bf16 inputs, float64
for float64 ones): QR and the core SVD are backward stable, so the kept singular values are accurate
to ~1e-6·σ_1 in float32 — below the rounding of any output dtype but float64 (tested against the
dense float64 SVD to 1e-5 relative).  :func:`singular_values` (for evaluations) stays in float64.
"""

from __future__ import annotations

import torch

from .units import RankUnits


def work_dtype(u: RankUnits) -> torch.dtype:
    """float32, or float64 when a factor is float64 (the inputs' precision, never below float32)."""
    return torch.promote_types(torch.promote_types(u.A.dtype, u.B.dtype), torch.float32)


def factor_svd(u: RankUnits, k: int | None = None, dtype: torch.dtype = torch.float64
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [d_out, k], S [m], Vh [k, d_in]): the top k (default: all m) singular vectors of ΔW and *all* m
    singular values (the discarded ones give the truncation error for free).

    Only the k kept columns of the core's factors are mapped back (Q_b U_c[:, :k], V_c[:k] Q_aᵀ): no
    full m×m products before truncating.  LAPACK calls run single-threaded under the thread policy
    (their bits would otherwise depend on the thread count).
    """
    from .threads import single_thread

    B = u.B.to(dtype)
    A = u.A.to(dtype)
    with single_thread():
        qb, rb = torch.linalg.qr(B, mode="reduced")
        qa, ra = torch.linalg.qr(A.T, mode="reduced")
        uc, s, vhc = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = s.shape[0] if k is None else min(k, s.shape[0])
    return qb @ uc[:, :k], s, vhc[:k] @ qa.T


def singular_values(u: RankUnits) -> torch.Tensor:
    """Singular values of ΔW (float64), from the core only."""
    B = u.B.double()
    A = u.A.double()
    rb = torch.linalg.qr(B, mode="r")[1]
    ra = torch.linalg.qr(A.T, mode="r")[1]
    return torch.linalg.svdvals(rb @ ra.T)


def truncate(u: RankUnits, k: int) -> RankUnits:
    """The best rank-k approximation of ΔW (Eckart–Young), as k balanced units b_j = u_j √σ_j, a_j = √σ_j v_j.

    Units of the result mix inputs, so their ``source`` is -1.
    """
    return truncate_with_spectrum(u, k)[0]


def truncate_with_spectrum(u: RankUnits, k: int) -> tuple[RankUnits, torch.Tensor]:
    """:func:`truncate` and all singular values of ΔW ([m], float64): ‖ΔW‖² = Σσ², ‖ΔW − ΔW_k‖² = Σ_{j>k} σ²."""
    U, S_all, Vh = factor_svd(u, k, work_dtype(u))
    k = U.shape[1]
    S = S_all[:k]
    root = S.clamp(min=0).sqrt()
    B = (U * root[None, :]).to(u.B.dtype)
    A = (root[:, None] * Vh).to(u.A.dtype)
    return u.with_factors(A, B, torch.full((k,), -1, dtype=torch.long)), S_all.double()
