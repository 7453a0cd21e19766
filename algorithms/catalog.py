"""The built-in algorithms as registry entries: name, description, ``Params``, and where the class lives.

Importing this module imports no torch: ``loramerge methods``, CLI flag checks and recipe validation read
these entries, and :meth:`~mergekit_lora.registry.AlgorithmEntry.load` imports an implementation when a
merge needs it.  Each class takes its metadata from its entry (``class Svd(Algorithm[SvdParams], entry=SVD)``).
"""

from __future__ import annotations

from mergekit_lora.registry import AlgorithmEntry, AlgorithmParams

from .lego.params import LegoParams
from .params import (
    DareLinearParams,
    DareTiesParams,
    IsoCParams,
    IsoCtsParams,
    KnotsDareTiesParams,
    KnotsTiesParams,
    LinearParams,
    MagnitudePruneParams,
    RouteParams,
    SvdParams,
    TiesParams,
    TsvParams,
)

_PKG = "mergekit_lora.algorithms"

LINEAR = AlgorithmEntry("linear", "task arithmetic: exact Σ wᵢ ΔWᵢ (rank Σ rᵢ, or rank k via exact SVD)",
                        LinearParams, f"{_PKG}.linear:Linear")
CAT = AlgorithmEntry("cat", "concatenate all rank units (rank Σ rᵢ); exact weighted sum",
                     AlgorithmParams, f"{_PKG}.cat:Cat")
SVD = AlgorithmEntry("svd", "best rank-k approximation of Σ wᵢ ΔWᵢ via exact factor-space SVD (k: rank, default max rᵢ)",
                     SvdParams, f"{_PKG}.svd:Svd")
TIES = AlgorithmEntry("ties", "TIES: trim to density by magnitude, elect sign, disjoint mean, × lambda; refactor to rank k",
                      TiesParams, f"{_PKG}.ties:Ties")
DARE_LINEAR = AlgorithmEntry(
    "dare_linear", "DARE: drop ΔW entries with prob 1−density, rescale 1/density (seeded), weighted sum; rank k",
    DareLinearParams, f"{_PKG}.dare:DareLinear")
DARE_TIES = AlgorithmEntry(
    "dare_ties", "DARE (seeded drop + rescale) then TIES sign election and disjoint mean, × lambda; rank k",
    DareTiesParams, f"{_PKG}.dare:DareTies")
MAGNITUDE_PRUNE = AlgorithmEntry(
    "magnitude_prune", "keep the top density of each ΔWᵢ by magnitude, then Σ wᵢ ΔWᵢ; refactor to rank k",
    MagnitudePruneParams, f"{_PKG}.magnitude_prune:MagnitudePrune")
LEGO = AlgorithmEntry("lego", "LoRA-LEGO: k-means over all inputs' rank units, centroids -> rank-k LoRA, dual reweighting",
                      LegoParams, f"{_PKG}.lego.algorithm:Lego")
# route keeps every unit: its default strength (`sum`) scales the weights so that they sum to n — each
# input's units at full strength under the default weights 1/n, as routing selects them per token
ROUTE = AlgorithmEntry("route", "rank routing: pool all units, activate the top-k per token (routed adapter + runtime)",
                       RouteParams, f"{_PKG}.route:Route", default_scale="sum")

KNOTS_TIES = AlgorithmEntry(
    "knots_ties", "KnOTS-TIES: TIES on each task's diag(s)·Vₜᵀ in the shared SVD basis U of [ΔW₁ … ΔW_T]; ΔW = U · merged",
    KnotsTiesParams, f"{_PKG}.knots:KnotsTies")
KNOTS_DARE_TIES = AlgorithmEntry(
    "knots_dare_ties", "KnOTS-DARE-TIES: DARE (seeded) then sign election + disjoint mean in the KnOTS basis",
    KnotsDareTiesParams, f"{_PKG}.knots:KnotsDareTies")
TSV = AlgorithmEntry("tsv", "TSV-M: each task's singular triplets, U and V decorrelated by polar factors (core variant)",
                     TsvParams, f"{_PKG}.tsv:Tsv")
ISO_C = AlgorithmEntry("iso_c", "Iso-C: the sum's singular vectors with a flat spectrum, mean σ (core variant)",
                       IsoCParams, f"{_PKG}.iso:IsoC")
ISO_CTS = AlgorithmEntry(
    "iso_cts", "Iso-CTS: common + task-specific directions, polar-decorrelated, flat spectrum (core variant)",
    IsoCtsParams, f"{_PKG}.iso:IsoCts")

BUILTINS = (LINEAR, CAT, SVD, TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE, KNOTS_TIES, KNOTS_DARE_TIES, TSV, ISO_C,
            ISO_CTS, LEGO, ROUTE)
