"""``knots_ties`` and ``knots_dare_ties``: KnOTS (ICLR 2025) — TIES / DARE-TIES in a shared SVD basis.

Per module, C = [w_1ΔW_1 | … | w_TΔW_T] (m×Tn) = U diag(s) [V_1ᵀ … V_Tᵀ]: the output-side basis U is shared
by all tasks, each task keeps its own k×n block X_t = diag(s) V_tᵀ.  TIES (trim, sign election, disjoint
mean; or DARE then sign election + disjoint mean) runs on the X_t, and ΔW' = U · merged(X).  The
pruning is decided on diag(s)V_tᵀ (not on V_tᵀ) as in the reference code and paper ("prune ΣV, merge
V": scaling a row by s > 0 keeps signs and zeros, so merging X_t is the same as merging V_t).

Factor space, never an m×n matrix: with B_stack = Q_B R_B and a QR per task A_tᵀ = Q_t R_t,
C = Q_B [R_B blockdiag(R_tᵀ)] blockdiag(Q_tᵀ); the SVD P S Zᵀ of the R×R middle gives U = Q_B P and
X_t = (S Zᵀ)[:, t] Q_tᵀ — again a product of k×r_t and r_t×n factors, so the fused trim/DARE/sign pass of
the dense methods runs on [1, k, n].  Cost O((m+n)R² + R³ + T k n) per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext, Notes
from mergekit_lora.units import RankUnits, sign_rule

from . import core_space as cs
from .catalog import KNOTS_DARE_TIES, KNOTS_TIES
from .elementwise import dense_combine_factors
from .params import KnotsDareTiesParams, KnotsTiesParams

# Components of C with s ≤ S_REL_TOL · s_max are dropped.  The reference keeps s > 1e-5 *absolute*, which
# depends on the adapters' scale (and on the weights); relative to s_max the rule is scale-free and, at
# typical LoRA scales (s_max ~ 0.1–1), close to the reference's cut.
S_REL_TOL = 1e-5


def knots_basis(units: Sequence[RankUnits], weights: Sequence[float]
                ) -> tuple[cs.Stack, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(stack, P [k_B, k], per-task factors (L_t [k, r_t], F_t [r_t, n]) with X_t = L_t F_t)."""
    st = cs.stack(units, weights, input_side=False)
    qs = [cs.qr(u.A.double().T) for u in units]  # A_tᵀ = Q_t R_t
    middle = torch.cat([st.RB[:, b] @ r.T for b, (_, r) in zip(st.blocks, qs)], 1)
    P, S, Zh = cs.svd(middle)
    k = max(1, int((S > S_REL_TOL * S[0]).sum())) if S[0] > 0 else 1
    sign = sign_rule((st.QB @ P[:, :k]).T)  # a sign convention for each component (u_i, z_i), see cs.sign_fixed
    SZ = (S[:k] * sign)[:, None] * Zh[:k]
    factors, start = [], 0
    for q, r in qs:
        w = r.shape[0]
        factors.append((SZ[:, start:start + w], q.T))
        start += w
    return st, P[:, :k] * sign[None, :], factors


def knots_merge(units: Sequence[RankUnits], weights: Sequence[float], step: dict[str, Any],
                rank: int | None) -> MergedModule:
    """ΔW' = U · merged(X_1 … X_T) as balanced factors (the SVD of the k×n merged X), rank ``rank`` or k."""
    st, P, factors = knots_basis(units, weights)
    X = dense_combine_factors([(L[None], F[None]) for L, F in factors], [1.0] * len(units), **step)[0]
    Px, Sx, Hx = cs.svd(X)  # ΔW' = Q_B (P Px) diag(Sx) Hx
    k = Sx.shape[0] if rank is None else rank
    out = cs.factors_out(st, P @ Px, Sx, Hx, k, core_rows=False)
    return MergedModule(out, notes={**cs.spectrum_notes(Sx, k, st.rank), "knots_rank": float(P.shape[1])})


class _Knots(Algorithm[Any]):
    def merge_module(self, units: list[RankUnits], weights: list[float], params: Any,
                     ctx: ModuleContext) -> MergedModule:
        return knots_merge(units, weights, self.step(params, ctx), params.rank)

    @staticmethod
    def step(params: Any, ctx: ModuleContext) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, notes: Sequence[tuple[str, Notes]], params: Any) -> dict[str, Any]:
        out = cs.report(notes, "KnOTS (shared output basis U of [ΔW₁ … ΔW_T]; per-module top-K)")
        if notes:
            out["KnOTS basis rank k (max over modules)"] = int(max(n["knots_rank"] for _, n in notes))
        return out


class KnotsTies(_Knots, entry=KNOTS_TIES):
    """KnOTS-TIES: per task keep the top ``int(ρ·k·n)`` |entries| of X_t = diag(s)V_tᵀ, elect the sign, disjoint
    mean; ΔW' = U · merged.  Deviations from the reference code: the top-K is per module (the reference's
    is global over all layers of a task; the pipeline streams modules, and CORE's own re-implementation is
    per layer too); exactly int(ρN) entries are kept (the reference keeps int(ρN)+1, ties included);
    components are kept when s > 1e-5·s_max (reference: s > 1e-5 absolute); the inputs' weights multiply
    each task's ΔW before the SVD (the reference has one global α, applied by the pipeline's ``scale``).
    """

    @staticmethod
    def step(params: KnotsTiesParams, ctx: ModuleContext) -> dict[str, Any]:
        return dict(combine=params.majority_sign, density=params.density)


class KnotsDareTies(_Knots, entry=KNOTS_DARE_TIES):
    """KnOTS-DARE-TIES: DARE (keep ``density``, rescale 1/density, seeded by (--seed, module name)) on each
    X_t, then sign election and disjoint mean (no magnitude trim: every reference config uses top-K 100)."""

    @staticmethod
    def step(params: KnotsDareTiesParams, ctx: ModuleContext) -> dict[str, Any]:
        return dict(combine=params.majority_sign, density=params.density, drop=[ctx.generator("dare")])
