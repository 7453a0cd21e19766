"""``magnitude_prune``: per-input magnitude pruning of dense ΔW, then the weighted sum, refactored to rank k."""

from __future__ import annotations

import torch

from mergekit_lora.registry import ModuleContext
from mergekit_lora.units import RankUnits

from .dense import DenseAlgorithm, DenseParams, dense_deltas, magnitude_trim


class MagnitudePruneParams(DenseParams):
    pass


class MagnitudePrune(DenseAlgorithm[MagnitudePruneParams]):
    """D = Σ w_i · trim_ρ(ΔW_i) (top ``int(ρ·numel)`` entries of each dense ΔW_i by magnitude), rank k.

    PEFT's ``magnitude_prune`` prunes A and B separately and sums them (cross terms, not pruning of
    ΔW); our D equals the intermediate of PEFT's ``magnitude_prune_svd`` for any weights, which PEFT
    then refactors with a dense full SVD (ours: seeded randomised SVD, or ``exact_svd``).
    """

    name = "magnitude_prune"
    description = "keep the top density of each ΔWᵢ by magnitude, then Σ wᵢ ΔWᵢ; refactor to rank k"
    Params = MagnitudePruneParams

    def dense(self, units: list[RankUnits], weights: list[float], params: MagnitudePruneParams,
              ctx: ModuleContext) -> torch.Tensor:
        return sum(w * magnitude_trim(d, params.density)  # type: ignore[return-value]
                   for d, w in zip(dense_deltas(units), weights))
