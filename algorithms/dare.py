"""``dare_linear`` and ``dare_ties``: random drop-and-rescale (DARE) of each dense ΔW, then linear or TIES."""

from __future__ import annotations

import torch

from mergekit_lora.registry import ModuleContext
from mergekit_lora.units import RankUnits

from .dense import DenseAlgorithm, DenseParams, SignParams, dare_drop, dense_deltas, elect_and_mean


class DareLinearParams(DenseParams):
    pass


class DareTiesParams(SignParams):
    pass


def _dropped(units: list[RankUnits], density: float, ctx: ModuleContext) -> list[torch.Tensor]:
    """DARE every input in order from one generator per module, seeded by (--seed, module name)."""
    gen = ctx.generator("dare")
    return [dare_drop(d, density, gen) for d in dense_deltas(units)]


class DareLinear(DenseAlgorithm[DareLinearParams]):
    """D = Σ w_i · (M_i ⊙ ΔW_i) / ρ with M_i ~ Bernoulli(ρ) per entry, refactored to rank k.

    The masks come from a generator seeded by (``--seed``, module name), drawn for the inputs in order,
    so the same seed gives the same bytes.  PEFT's ``dare_linear`` drops entries of A and B separately
    (not DARE on ΔW); our D is what PEFT's ``dare_linear_svd`` forms before its dense SVD, given the same
    masks (PEFT draws them from the global torch RNG, unseeded unless the caller seeds it).
    """

    name = "dare_linear"
    description = "DARE: drop ΔW entries with prob 1−density, rescale 1/density (seeded), weighted sum; rank k"
    Params = DareLinearParams

    def dense(self, units: list[RankUnits], weights: list[float], params: DareLinearParams,
              ctx: ModuleContext) -> torch.Tensor:
        return sum(w * d for d, w in zip(_dropped(units, params.density, ctx), weights))  # type: ignore[return-value]


class DareTies(DenseAlgorithm[DareTiesParams]):
    """D = λ · disjoint_mean_s(w_i · (M_i ⊙ ΔW_i) / ρ): DARE instead of magnitude trimming, then TIES.

    Masks as in ``dare_linear``; sign election and disjoint mean as in ``ties`` (on the weighted
    tensors).  PEFT's ``dare_ties`` works on A and B separately; its ``dare_ties_svd`` forms our D for
    equal positive weights and the same masks, elects the sign on unweighted tensors and has no λ.
    """

    name = "dare_ties"
    description = "DARE (seeded drop + rescale) then TIES sign election and disjoint mean, × lambda; rank k"
    Params = DareTiesParams

    def dense(self, units: list[RankUnits], weights: list[float], params: DareTiesParams,
              ctx: ModuleContext) -> torch.Tensor:
        xs = [w * d for d, w in zip(_dropped(units, params.density, ctx), weights)]
        return params.lambda_ * elect_and_mean(xs, params.majority_sign)
