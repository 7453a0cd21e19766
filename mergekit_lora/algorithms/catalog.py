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

# Each method's default strength (what `scale: auto` means), chosen by evals/suite/select_defaults.py on the
# validation slices of three selection scenarios only and reported on held-out ones (evals/RESULTS.md,
# "Suite v3").  `linear` is the reference (the exact weighted sum); route keeps every unit: `sum` scales the
# weights to sum to n, each input's units at full strength under the default weights 1/n.
DEFAULT_SCALES = {"svd": "2*average", "ties": "2*average", "dare_linear": "2*average", "dare_ties": "2*average",
                  "magnitude_prune": "1.5*average", "lego": "1.5*average", "knots_ties": "2*average",
                  "knots_dare_ties": "3*average", "tsv": "2*average", "iso_c": "4*average", "iso_cts": "4*average",
                  "route": "sum"}


def _entry(name: str, description: str, params: type[AlgorithmParams], target: str,
           output_format: str | None = None) -> AlgorithmEntry:
    return AlgorithmEntry(name, description, params, f"{_PKG}.{target}", DEFAULT_SCALES.get(name, "none"),
                          output_format)


LINEAR = _entry("linear", "task arithmetic: exact Σ wᵢ ΔWᵢ (rank Σ rᵢ, or rank k via exact SVD)",
               LinearParams, "linear:Linear")
CAT = _entry("cat", "concatenate all rank units (rank Σ rᵢ); exact weighted sum",
               AlgorithmParams, "cat:Cat")
SVD = _entry("svd", "best rank-k approximation of Σ wᵢ ΔWᵢ via exact factor-space SVD (k: rank, default max rᵢ)",
               SvdParams, "svd:Svd")
TIES = _entry("ties", "TIES: trim to density by magnitude, elect sign, disjoint mean, × lambda; refactor to rank k",
               TiesParams, "ties:Ties")
DARE_LINEAR = _entry(
    "dare_linear", "DARE: drop ΔW entries with prob 1−density, rescale 1/density (seeded), weighted sum; rank k",
    DareLinearParams, "dare:DareLinear")
DARE_TIES = _entry(
    "dare_ties", "DARE (seeded drop + rescale) then TIES sign election and disjoint mean, × lambda; rank k",
    DareTiesParams, "dare:DareTies")
MAGNITUDE_PRUNE = _entry(
    "magnitude_prune", "keep the top density of each ΔWᵢ by magnitude, then Σ wᵢ ΔWᵢ; refactor to rank k",
    MagnitudePruneParams, "magnitude_prune:MagnitudePrune")
LEGO = _entry("lego", "LoRA-LEGO: k-means over all inputs' rank units, centroids -> rank-k LoRA, dual reweighting",
               LegoParams, "lego.algorithm:Lego")
ROUTE = _entry("route", "rank routing: pool all units, activate the top-k per token (routed adapter + runtime)",
               RouteParams, "route:Route", output_format="routed")

KNOTS_TIES = _entry(
    "knots_ties", "KnOTS-TIES: TIES on each task's diag(s)·Vₜᵀ in the shared SVD basis U of [ΔW₁ … ΔW_T]; ΔW = U · merged",
    KnotsTiesParams, "knots:KnotsTies")
KNOTS_DARE_TIES = _entry(
    "knots_dare_ties", "KnOTS-DARE-TIES: DARE (seeded) then sign election + disjoint mean in the KnOTS basis",
    KnotsDareTiesParams, "knots:KnotsDareTies")
TSV = _entry("tsv", "TSV-M: each task's singular triplets, U and V decorrelated by polar factors (core variant)",
               TsvParams, "tsv:Tsv")
ISO_C = _entry("iso_c", "Iso-C: the sum's singular vectors with a flat spectrum, mean σ (core variant)",
               IsoCParams, "iso:IsoC")
ISO_CTS = _entry(
    "iso_cts", "Iso-CTS: common + task-specific directions, polar-decorrelated, flat spectrum (core variant)",
    IsoCtsParams, "iso:IsoCts")

BUILTINS = (LINEAR, CAT, SVD, TIES, DARE_LINEAR, DARE_TIES, MAGNITUDE_PRUNE, KNOTS_TIES, KNOTS_DARE_TIES, TSV, ISO_C,
            ISO_CTS, LEGO, ROUTE)
