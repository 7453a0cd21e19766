"""``ties``: TIES-merging (trim, elect sign, disjoint mean) on dense ΔW, refactored to rank k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.registry import ModuleContext
from mergekit_lora.units import RankUnits

from .catalog import TIES
from .dense import DenseAlgorithm, chunk_workers, dense_combine
from .params import TiesParams


def ties_step(params: TiesParams, ctxs: Sequence[ModuleContext]) -> dict[str, Any]:
    """Trim to density, elect sign, disjoint mean, × λ (the same step in full and core space)."""
    return dict(combine=params.majority_sign, density=params.density, scale=params.lambda_,
                sign_from=params.sign_from)


def ties_dense(modules: Sequence[Sequence[RankUnits]], weights: Sequence[float], params: TiesParams,
               ctxs: Sequence[ModuleContext], dtype: torch.dtype) -> torch.Tensor:
    """D [M, d_out, d_in] = λ · disjoint_mean_s(w_i · trim_ρ(ΔW_i)) for a batch of same-shape modules."""
    return dense_combine(modules, weights, dtype, workers=chunk_workers(modules, ctxs), **ties_step(params, ctxs))


class Ties(DenseAlgorithm[TiesParams], entry=TIES):
    """D = λ · disjoint_mean_s(w_i · trim_ρ(ΔW_i)), refactored to rank k by a truncated SVD.

    trim_ρ keeps the top ``int(ρ·numel)`` entries of each input's dense ΔW_i by magnitude; the sign s of
    each entry is elected from the weighted trimmed tensors x_i = w_i trim_ρ(ΔW_i) (sign of Σ x_i, or of
    Σ sign(x_i) with ``majority_sign=frequency``); the disjoint mean averages the x_i agreeing with s.
    ``sign_from=unweighted`` elects s on the unweighted trim_ρ(ΔW_i) instead and averages the w_i·trim_ρ(ΔW_i)
    whose unweighted entry agrees with it: PEFT's rule.
    Differences from PEFT: PEFT's ``ties`` trims A and B separately (a different, inexact method); our
    D equals PEFT's ``ties_svd`` intermediate for any weights with ``sign_from=unweighted`` (λ = 1), and by
    default only for equal positive weights (PEFT elects the sign on the *unweighted* trimmed tensors, so
    negative or unequal weights differ) — PEFT has no λ.
    PEFT refactors with a dense full SVD; ours is exact for small matrices and a subspace iteration that
    matches the exact rank-k SVD to ~1e-4 otherwise (``exact_svd`` forces the exact one).
    ``space=core``: the same steps on the R×R core matrices (Core Space merging, :mod:`algorithms.core_space`).
    """

    dense_batch = staticmethod(ties_dense)
    elementwise = staticmethod(ties_step)
