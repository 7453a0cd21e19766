"""``ties``: TIES-merging (trim, elect sign, disjoint mean) on dense ΔW, refactored to rank k."""

from __future__ import annotations

import torch

from mergekit_lora.registry import ModuleContext
from mergekit_lora.units import RankUnits

from .dense import DenseAlgorithm, SignParams, dense_deltas, elect_and_mean, magnitude_trim


class TiesParams(SignParams):
    pass


class Ties(DenseAlgorithm[TiesParams]):
    """D = λ · disjoint_mean_s(w_i · trim_ρ(ΔW_i)), refactored to rank k by a truncated SVD.

    trim_ρ keeps the top ``int(ρ·numel)`` entries of each input's dense ΔW_i by magnitude; the sign s of
    each entry is elected from the weighted trimmed tensors x_i = w_i trim_ρ(ΔW_i) (sign of Σ x_i, or of
    Σ sign(x_i) with ``majority_sign=frequency``); the disjoint mean averages the x_i agreeing with s.
    Differences from PEFT: PEFT's ``ties`` trims A and B separately (a different, inexact method); our
    D equals PEFT's ``ties_svd`` intermediate when the weights are equal and positive, but PEFT elects
    the sign on the *unweighted* trimmed tensors (so negative or unequal weights differ), has no λ, and
    uses a dense full SVD where we default to a seeded randomised SVD (``exact_svd`` for the exact one).
    """

    name = "ties"
    description = "TIES: trim to density by magnitude, elect sign, disjoint mean, × lambda; refactor to rank k"
    Params = TiesParams

    def dense(self, units: list[RankUnits], weights: list[float], params: TiesParams,
              ctx: ModuleContext) -> torch.Tensor:
        xs = [w * magnitude_trim(d, params.density) for d, w in zip(dense_deltas(units), weights)]
        return params.lambda_ * elect_and_mean(xs, params.majority_sign)
