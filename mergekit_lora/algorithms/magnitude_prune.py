"""``magnitude_prune``: per-input magnitude pruning of dense ΔW, then the weighted sum, refactored to rank k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.registry import ModuleContext
from mergekit_lora.units import RankUnits

from .catalog import MAGNITUDE_PRUNE
from .dense import DenseAlgorithm, chunk_workers, dense_combine
from .params import MagnitudePruneParams


def magnitude_prune_dense(modules: Sequence[Sequence[RankUnits]], weights: Sequence[float],
                          params: MagnitudePruneParams, ctxs: Sequence[ModuleContext],
                          dtype: torch.dtype) -> torch.Tensor:
    """D [M, d_out, d_in] = Σ w_i · trim_ρ(ΔW_i) for a batch of same-shape modules."""
    return dense_combine(modules, weights, dtype, workers=chunk_workers(modules, ctxs), **prune_step(params, ctxs))


def prune_step(params: MagnitudePruneParams, ctxs: Sequence[ModuleContext]) -> dict[str, Any]:
    """Trim each input to density, then sum (the same step in full and core space)."""
    return dict(combine="sum", density=params.density)


class MagnitudePrune(DenseAlgorithm[MagnitudePruneParams], entry=MAGNITUDE_PRUNE):
    """D = Σ w_i · trim_ρ(ΔW_i) (top ``int(ρ·numel)`` entries of each dense ΔW_i by magnitude), rank k.

    PEFT's ``magnitude_prune`` prunes A and B separately and sums them (cross terms, not pruning of
    ΔW); our D equals the intermediate of PEFT's ``magnitude_prune_svd`` for any weights, which PEFT
    then refactors with a dense full SVD (ours: see :mod:`algorithms.dense`, or ``exact_svd``).
    """

    dense_batch = staticmethod(magnitude_prune_dense)
    elementwise = staticmethod(prune_step)
