"""``iso_c`` and ``iso_cts``: isotropic merging (ICML 2025), core variants, in factor space.

Iso-C flattens the spectrum of the task sum: Σ w_tΔW_t = U diag(σ) Vᵀ -> mean(σ) · U Vᵀ.  Iso-CTS keeps a
common subspace of the sum and adds each task's strongest directions orthogonal to it, decorrelates all
of them (polar factors) and flattens the spectrum.  Both run on the k_B×k_A cores in the QR coordinates of
the stacked B's and A's (both are invariant to rotations of those bases), so no m×n matrix is formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext, Notes
from mergekit_lora.units import RankUnits

from . import core_space as cs
from .catalog import ISO_C, ISO_CTS
from .params import IsoCParams, IsoCtsParams


def iso_c_parts(st: cs.Stack) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, S, H): the sum's singular vectors with every singular value := Σσ / R (R = Σ r_t)."""
    P, S, H = cs.svd(st.RB @ st.RA.T)
    keep = max(1, int((S > cs.NULL_TOL * S[0]).sum())) if S[0] > 0 else 1
    return P[:, :keep], torch.full((keep,), float(S.sum()) / st.rank, dtype=S.dtype, device=S.device), H[:keep]


def cts_split(k: int, T: int, fraction: float) -> tuple[int, int]:
    """(c, n_t): common directions and directions per task, as the reference rounds them (k = c + T·n_t)."""
    c = int(k * fraction)
    ts_total = round((k - c) / T) * T
    c = k - ts_total
    return c, (k - c) // T


def iso_cts_parts(st: cs.Stack, fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, S, H) of Iso-CTS in core coordinates, directions ordered by their singular value before flattening."""
    cores = [L @ F for L, F in (st.core(t) for t in range(len(st.blocks)))]
    total = torch.stack(cores).sum(0)
    k = min(total.shape)
    c, n_t = cts_split(k, len(cores), fraction)
    u, s, vh = cs.svd(total)
    Uc = u[:, :c]
    us, ss, vs = [], [], []
    for K in cores:
        ut, st_, vht = cs.svd(K - Uc @ (Uc.T @ K))  # the task's part outside the common (left) subspace
        us.append(ut[:, :n_t])
        ss.append(st_[:n_t])
        vs.append(vht[:n_t].T)
    S = torch.cat([*ss, s[:c]])
    mean = float(S.mean())  # over all k slots, zeros included
    keep = torch.argsort(S, descending=True, stable=True)
    keep = keep[S[keep] > cs.NULL_TOL * S.max()]  # null directions (rank-deficient inputs) are arbitrary: left out
    U = cs.polar(torch.cat([*us, Uc], 1)[:, keep])
    V = cs.polar(torch.cat([*vs, vh[:c].T], 1)[:, keep])
    return U, torch.full((U.shape[1],), mean, dtype=S.dtype, device=S.device), V.T


class IsoC(Algorithm[IsoCParams], entry=ISO_C):
    """Iso-C, core variant: ΔW' = (Σσ_i / R) · U Vᵀ from the exact SVD of Σ w_tΔW_t (U, V: its R directions).

    The mean runs over R = Σ r_t values, zeros included when the sum has rank < R; null directions
    (σ ≤ 1e-10 σ_max) are not output (the reference would add arbitrary ones).  Full-space Iso-C on a
    LoRA sum averages over min(m, n) values and returns a full-rank update with arbitrary null-space
    completions; the constant is absorbed by the global scale, the completions are not reproducible.
    ``rank`` < R keeps the sum's k strongest directions.  No internal α.
    """

    def merge_module(self, units: list[RankUnits], weights: list[float], params: IsoCParams,
                     ctx: ModuleContext) -> MergedModule:
        st = cs.stack(units, weights)
        return cs.merged(st, *iso_c_parts(st), params.rank)

    def report(self, notes: Sequence[tuple[str, Notes]], params: IsoCParams) -> dict[str, Any]:
        return cs.report(notes, "core (isotropic spectrum of the sum; exact)")


class IsoCts(Algorithm[IsoCtsParams], entry=ISO_CTS):
    """Iso-CTS, core variant (by analogy: no reference code runs it in core space; the composition is ours).

    On the cores K_t (k = R): c = int(k·f) common directions from the SVD of Σ K_t (rounded as the
    reference: k − c a multiple of T), n_t = (k − c)/T per task from the SVD of K_t − U_c U_cᵀ K_t, the
    concatenated U and V replaced by their polar factors, every singular value by the mean of all the
    kept ones.  ``rank`` < R keeps the directions with the largest singular values before flattening.
    """

    def merge_module(self, units: list[RankUnits], weights: list[float], params: IsoCtsParams,
                     ctx: ModuleContext) -> MergedModule:
        st = cs.stack(units, weights)
        return cs.merged(st, *iso_cts_parts(st, params.common_fraction), params.rank)

    def report(self, notes: Sequence[tuple[str, Notes]], params: IsoCtsParams) -> dict[str, Any]:
        return cs.report(notes, f"core (Iso-CTS, common fraction {params.common_fraction}; exact)")
