"""``svd``: the best rank-k approximation of Σ w_i ΔW_i, computed exactly in factor space."""

from __future__ import annotations

from pydantic import Field

from mergekit_lora.lowrank import truncate
from mergekit_lora.registry import Algorithm, AlgorithmParams, MergedModule, ModuleContext
from mergekit_lora.units import RankUnits


class SvdParams(AlgorithmParams):
    rank: int | None = Field(None, ge=1, description="output rank k (default: the largest input rank)")


class Svd(Algorithm[SvdParams]):
    """ΔW_k = argmin_{rank ≤ k} ‖X − Σ w_i B_i A_i‖_F (Eckart–Young), k = ``rank`` or max r_i.

    The sum is formed exactly by concatenation ([w_1 B_1 … w_n B_n][A_1; …; A_n]); its SVD comes from a
    QR of the stacked B, a QR of the stacked Aᵀ and an SVD of the small (Σr)×(Σr) core
    (:func:`mergekit_lora.lowrank.truncate`), in float64.  PEFT's ``svd`` computes the same ΔW_k (the
    truncation is unique when σ_k > σ_{k+1}) but through a dense d_out×d_in full SVD per module with
    the base model and all adapters in memory; its factors are (U S, Vᵀ), ours are balanced (U √S, √S Vᵀ).
    """

    name = "svd"
    description = "best rank-k approximation of Σ wᵢ ΔWᵢ via exact factor-space SVD (k: rank, default max rᵢ)"
    Params = SvdParams

    def merge_module(self, units: list[RankUnits], weights: list[float], params: SvdParams,
                     ctx: ModuleContext) -> MergedModule:
        total = RankUnits.concat([u.scaled(w) for u, w in zip(units, weights)])
        return MergedModule(truncate(total, params.rank or max(u.rank for u in units)))
