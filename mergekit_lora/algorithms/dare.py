"""``dare_linear`` and ``dare_ties``: random drop-and-rescale (DARE) of each dense ΔW, then linear or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.registry import ModuleContext
from mergekit_lora.units import RankUnits

from .catalog import DARE_LINEAR, DARE_TIES
from .dense import DenseAlgorithm, chunk_workers, dense_combine
from .params import DareLinearParams, DareTiesParams


def dare_linear_dense(modules: Sequence[Sequence[RankUnits]], weights: Sequence[float], params: DareLinearParams,
                      ctxs: Sequence[ModuleContext], dtype: torch.dtype) -> torch.Tensor:
    """D = Σ w_i · (M_i ⊙ ΔW_i) / ρ for a batch of same-shape modules; each module's masks come from its
    own generator seeded by (--seed, module name), drawn for the inputs in order."""
    return dense_combine(modules, weights, dtype, workers=chunk_workers(modules, ctxs), **dare_linear_step(params, ctxs))


def dare_linear_step(params: DareLinearParams, ctxs: Sequence[ModuleContext]) -> dict[str, Any]:
    """Seeded drop + rescale, then the sum (the same step in full and core space)."""
    return dict(combine="sum", density=params.density, drop=[c.generator("dare") for c in ctxs])


def dare_ties_step(params: DareTiesParams, ctxs: Sequence[ModuleContext]) -> dict[str, Any]:
    """Seeded drop + rescale, sign election, disjoint mean, × λ."""
    return dict(combine=params.majority_sign, density=params.density, drop=[c.generator("dare") for c in ctxs],
                scale=params.lambda_, sign_from=params.sign_from)


def dare_ties_dense(modules: Sequence[Sequence[RankUnits]], weights: Sequence[float], params: DareTiesParams,
                    ctxs: Sequence[ModuleContext], dtype: torch.dtype) -> torch.Tensor:
    """D = λ · disjoint_mean_s(w_i · (M_i ⊙ ΔW_i) / ρ) for a batch of same-shape modules (masks as above)."""
    return dense_combine(modules, weights, dtype, workers=chunk_workers(modules, ctxs), **dare_ties_step(params, ctxs))


class DareLinear(DenseAlgorithm[DareLinearParams], entry=DARE_LINEAR):
    """D = Σ w_i · (M_i ⊙ ΔW_i) / ρ with M_i ~ Bernoulli(ρ) per entry, refactored to rank k.

    The masks come from a generator seeded by (``--seed``, module name), drawn for the inputs in order,
    so the same seed gives the same bytes.  PEFT's ``dare_linear`` drops entries of A and B separately
    (not DARE on ΔW); our D is what PEFT's ``dare_linear_svd`` forms before its dense SVD, given the same
    masks (PEFT draws them from the global torch RNG, unseeded unless the caller seeds it).
    """

    dense_batch = staticmethod(dare_linear_dense)
    elementwise = staticmethod(dare_linear_step)


class DareTies(DenseAlgorithm[DareTiesParams], entry=DARE_TIES):
    """D = λ · disjoint_mean_s(w_i · (M_i ⊙ ΔW_i) / ρ): DARE instead of magnitude trimming, then TIES.

    Masks as in ``dare_linear``; sign election and disjoint mean as in ``ties`` (on the weighted
    tensors; ``sign_from=unweighted``: on the unweighted ones, PEFT's rule).  PEFT's ``dare_ties`` works on
    A and B separately; its ``dare_ties_svd`` forms our D given the same masks for equal positive weights,
    and for any weights with ``sign_from=unweighted`` (λ = 1); PEFT has no λ.
    """

    dense_batch = staticmethod(dare_ties_dense)
    elementwise = staticmethod(dare_ties_step)
