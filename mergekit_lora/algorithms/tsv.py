"""``tsv``: TSV-M (Task Singular Vectors, CVPR 2025), the core ("clean") variant, in factor space.

Per module: each weighted task update w_tΔW_t = U_t diag(s_t) V_tᵀ (thin SVD, r_t components); the
blocks are concatenated, U_cat = [U_1 … U_T] (m×R), V_cat likewise, and decorrelated by their polar
factors: ΔW' = polar(U_cat) diag(s_cat) polar(V_cat)ᵀ.  All U_t lie in span(B_stack) = span(Q_B), so
U_cat = Q_B X and polar(U_cat) = Q_B polar(X) with X (k_B×R) from the task cores K_t; the same on the input
side with Q_A.  Cost O((m+n)R² + R³) per module; output rank R (or ``rank``: exact SVD truncation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext, Notes
from mergekit_lora.units import RankUnits

from . import core_space as cs
from .catalog import TSV
from .params import TsvParams


def tsv_core(st: cs.Stack) -> torch.Tensor:
    """polar(X) diag(s_cat) polar(Y)ᵀ in core coordinates (k_B×k_A)."""
    us, ss, vs = [], [], []
    for t in range(len(st.blocks)):
        u, s, vh = cs.product_svd(*st.core(t))
        us.append(u)
        ss.append(s)
        vs.append(vh.T)
    s_cat = torch.cat(ss)
    return (cs.polar(torch.cat(us, 1)) * s_cat[None, :]) @ cs.polar(torch.cat(vs, 1)).T


class Tsv(Algorithm[TsvParams], entry=TSV):
    """TSV-M: ΔW' = polar([U_1 … U_T]) diag([s_1 … s_T]) polar([V_1 … V_T])ᵀ with each task's thin SVD.

    Core variant (as in Core Space merging, where it equals the reference on the core matrices): each
    task contributes exactly its r_t singular triplets.  Deviations: the reference's full-space TSV on a
    LoRA pads each task to int(min(m, n)/T) vectors with arbitrary null-space completions (not
    reproducible, and not meaningful); with mixed ranks the reference takes int(R/T) per task, which
    truncates tasks with r_t > R/T — here each task keeps its r_t (lossless blocks).  No internal α.
    """

    def merge_module(self, units: list[RankUnits], weights: list[float], params: TsvParams,
                     ctx: ModuleContext) -> MergedModule:
        st = cs.stack(units, weights)
        return cs.merged_core(st, tsv_core(st), params.rank)

    def report(self, notes: Sequence[tuple[str, Notes]], params: TsvParams) -> dict[str, Any]:
        return cs.report(notes, "core (TSV-M with r_t singular triplets per task; exact)")
