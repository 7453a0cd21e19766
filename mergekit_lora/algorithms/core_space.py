"""Core Space: the factor-space machinery shared by the 2025 LoRA merges (core TIES/DARE, TSV, Iso-C/CTS).

Per module, with T inputs of ranks r_t (scale folded into B_t), weights w_t and R = Σ r_t:

    B_stack = [w_1 B_1 … w_T B_T]  (m×R) = Q_B R_B      (reduced QR, Q_B m×k_B, k_B = min(m, R))
    A_stack = [A_1; …; A_T]        (R×n),  A_stackᵀ = Q_A R_A   (Q_A n×k_A)

so every weighted task update is w_t ΔW_t = Q_B K_t Q_Aᵀ with the small core K_t = R_B[:, t] R_A[:, t]ᵀ
(k_B×k_A, a product of a k_B×r_t and an r_t×k_A factor), and Σ_t w_t ΔW_t = Q_B (R_B R_Aᵀ) Q_Aᵀ.  No m×n
matrix is ever formed: the work is two QRs (O((m+n)R²)) and SVDs of R×R matrices (O(R³)).

All small math runs in float64; LAPACK (QR, SVD) under :func:`~mergekit_lora.threads.single_thread`, so
the bytes do not depend on the thread count.  Results are returned as balanced factors
(B' = Q_B P √S, A' = √S Hᵀ Q_Aᵀ from the SVD P S Hᵀ of the merged core), truncated to ``rank`` when given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mergekit_lora.registry import MergedModule, Notes
from mergekit_lora.threads import single_thread
from mergekit_lora.units import RankUnits, sign_rule


@dataclass(frozen=True)
class Stack:
    """One module's stacked, weighted inputs in QR form (float64)."""

    QB: torch.Tensor  # [m, k_B]
    RB: torch.Tensor  # [k_B, R]
    QA: torch.Tensor  # [n, k_A]
    RA: torch.Tensor  # [k_A, R]
    blocks: tuple[slice, ...]  # input t's columns of RB / RA
    like: RankUnits  # the first input (module metadata)
    dtype: torch.dtype  # output dtype: the inputs' promoted precision

    @property
    def rank(self) -> int:
        """R = Σ r_t."""
        return int(self.RB.shape[1])

    def core(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input t's weighted core K_t = L_t F_t as factors (L_t [k_B, r_t], F_t [r_t, k_A])."""
        b = self.blocks[t]
        return self.RB[:, b], self.RA[:, b].T


def out_dtype(units: Sequence[RankUnits]) -> torch.dtype:
    dt = units[0].B.dtype
    for u in units:
        dt = torch.promote_types(dt, torch.promote_types(u.A.dtype, u.B.dtype))
    return dt


def stack(units: Sequence[RankUnits], weights: Sequence[float], input_side: bool = True) -> Stack:
    """QR of the weighted B_stack and of A_stackᵀ (float64, single-threaded LAPACK); ``input_side=False``
    skips the A side (KnOTS has its own per-task QRs there): QA and RA are then empty."""
    B = torch.cat([u.B.double() * float(w) for u, w in zip(units, weights)], 1)
    blocks, start = [], 0
    for u in units:
        blocks.append(slice(start, start + u.rank))
        start += u.rank
    QB, RB = qr(B)
    if input_side:
        QA, RA = qr(torch.cat([u.A.double() for u in units], 0).T)
    else:
        QA = RA = B.new_zeros(0, 0)
    return Stack(QB, RB, QA, RA, tuple(blocks), units[0], out_dtype(units))


def svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S descending, Vh), single-threaded LAPACK; a very wide or tall X goes through a QR first
    (3× faster than LAPACK's SVD of a 64×5632 matrix, measured)."""
    p, q = X.shape
    with single_thread():
        if q > 2 * p:
            Q, R = torch.linalg.qr(X.T, mode="reduced")
            u, s, vh = torch.linalg.svd(R.T, full_matrices=False)
            return u, s, vh @ Q.T
        if p > 2 * q:
            Q, R = torch.linalg.qr(X, mode="reduced")
            u, s, vh = torch.linalg.svd(R, full_matrices=False)
            return Q @ u, s, vh
        return torch.linalg.svd(X, full_matrices=False)


def qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with single_thread():
        return torch.linalg.qr(X, mode="reduced")


def product_svd(L: torch.Tensor, F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of L @ F (L [p, r], F [r, q]) from QRs of L and Fᵀ and an r×r SVD."""
    ql, rl = qr(L)
    qf, rf = qr(F.T)
    u, s, vh = svd(rl @ rf.T)
    return ql @ u, s, vh @ qf.T


def sign_fixed(Q: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """U's columns with signs such that each column of Q U has its largest-|entry| positive (first on ties).

    Singular vectors are defined up to sign; methods with ties in a sign election (``frequency``) are not
    sign-invariant, so the basis gets a convention that depends on the matrices only, not on LAPACK."""
    return U * sign_rule((Q @ U).T)[None, :]


# Singular values ≤ NULL_TOL · σ_max are treated as exact zeros (their singular vectors are arbitrary).
NULL_TOL = 1e-10


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of X = U Σ Vᵀ (the nearest matrix with orthonormal columns/rows).

    Over X's numerical range only (σ > NULL_TOL·σ_max): for a rank-deficient X (e.g. two identical tasks in
    TSV) LAPACK's null-space completions are arbitrary, so they are left out (a partial isometry); for a
    full-rank X this is the usual polar factor."""
    u, s, vh = svd(X)
    k = int((s > NULL_TOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :k] @ vh[:k]


def factors_out(st: Stack, P: torch.Tensor, S: torch.Tensor, H: torch.Tensor, k: int,
                core_rows: bool = True) -> RankUnits:
    """Balanced units of Q_B P[:, :k] diag(S[:k]) H[:k] Q_Aᵀ (P, S, H: an SVD-like triple in core coordinates;
    with ``core_rows=False`` H's rows are already in input space: no Q_Aᵀ)."""
    if S.shape[0] == 0:  # nothing left (all inputs zero): one zero unit
        P, S, H = P.new_zeros(P.shape[0], 1), S.new_zeros(1), H.new_zeros(1, H.shape[1])
    k = max(1, min(k, S.shape[0]))
    root = S[:k].clamp(min=0).sqrt()
    B = st.QB @ (P[:, :k] * root[None, :])
    A = root[:, None] * H[:k]
    if core_rows:
        A = A @ st.QA.T
    src = torch.full((k,), -1, dtype=torch.long)
    return replace(st.like, A=A.to(st.dtype), B=B.to(st.dtype), source=src, extra={})


def spectrum_notes(S: torch.Tensor, k: int, R: int) -> dict[str, float]:
    """Per-module notes: output rank, R, and the truncation error² / total² from the spectrum."""
    k = max(1, min(k, S.shape[0]))
    s2 = S.double().square()
    return {"rank": float(k), "core_rank": float(R), "trunc_err2": float(s2[k:].sum()), "norm2": float(s2.sum())}


def merged(st: Stack, P: torch.Tensor, S: torch.Tensor, H: torch.Tensor, k: int | None,
           extra: Notes | None = None) -> MergedModule:
    """The MergedModule of the merged core P diag(S) H (rank k, default all), with its notes."""
    kk = S.shape[0] if k is None else k
    notes = {**spectrum_notes(S, kk, st.rank), **(extra or {})}
    return MergedModule(factors_out(st, P, S, H, kk), notes=notes)


def merged_core(st: Stack, mid: torch.Tensor, k: int | None, extra: Notes | None = None) -> MergedModule:
    """The MergedModule of Q_B · mid · Q_Aᵀ (mid [k_B, k_A]), re-ranked by the exact SVD of mid."""
    P, S, H = svd(mid)
    return merged(st, P, S, H, k, extra)


def report(notes: Sequence[tuple[str, Notes]], what: str) -> dict[str, Any]:
    """Output ranks and the rank-truncation error over all modules (root of summed squares)."""
    if not notes:
        return {}
    ns = [n for _, n in notes]
    ranks = sorted({int(n["rank"]) for n in ns})
    e2 = sum(n["trunc_err2"] for n in ns)
    t2 = sum(n["norm2"] for n in ns)
    return {"space": what,
            "output rank": ranks[0] if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}",
            "core rank R = Σ rᵢ": int(max(n["core_rank"] for n in ns)),
            "rank-truncation rel. error (overall)": math.sqrt(e2 / t2) if t2 else 0.0}


# ---------------------------------------------------------------------------------------- core elementwise
def elementwise_merge(units: Sequence[RankUnits], weights: Sequence[float], combine_kwargs: dict[str, Any],
                      rank: int | None) -> MergedModule:
    """Core Space merging of an elementwise method (TIES, DARE, magnitude pruning) on one module.

    The bases are the singular vectors of B_stack and of A_stack *separately* (U_B = Q_B U_b, V_A = Q_A U_a
    with U_b, U_a the left singular vectors of R_B and R_A, descending, signs by :func:`sign_fixed`):
    elementwise methods depend on the basis, and these are the reference's.  Core matrices M_t = U_bᵀ K_t U_a = (U_bᵀ R_B[:, t])
    (R_A[:, t]ᵀ U_a) are handed as factors to the same fused trim/DARE/sign-election pass as the full
    space (:func:`~algorithms.elementwise.dense_combine_factors`, on [1, k_B, k_A]); the weights are
    already in B_stack.  With ``sign_from="unweighted"`` (PEFT's sign rule) the pass gets the *unweighted*
    cores U_bᵀ Q_Bᵀ B_t (R_A[:, t]ᵀ U_a) and the weights instead (for w_t ≠ 0, Q_Bᵀ B_t = R_B[:, t] / w_t; a zero
    weight's task votes with its projection onto the basis).  ΔW' = U_B M* V_Aᵀ, re-ranked by the exact SVD
    of M* (default rank R: lossless).
    """
    from .elementwise import dense_combine_factors

    st = stack(units, weights)
    Ub, Ua = sign_fixed(st.QB, svd(st.RB)[0]), sign_fixed(st.QA, svd(st.RA)[0])
    unweighted = combine_kwargs.get("sign_from") == "unweighted" and combine_kwargs.get("combine") != "sum"
    factors = []
    for t, u in enumerate(units):
        L, F = st.core(t)
        if unweighted:
            L = st.QB.T @ u.B.double()
        factors.append(((Ub.T @ L)[None], (F @ Ua)[None]))
    w = [float(x) for x in weights] if unweighted else [1.0] * len(units)
    core = dense_combine_factors(factors, w, **combine_kwargs)[0]
    return merged_core(st, Ub @ core @ Ua.T, rank)
