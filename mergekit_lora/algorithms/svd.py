"""``svd``: the best rank-k approximation of Σ w_i ΔW_i, computed exactly in factor space."""

from __future__ import annotations

from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.lowrank import truncate_with_spectrum
from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext
from mergekit_lora.units import RankUnits

from .catalog import SVD
from .params import SvdParams


class Svd(Algorithm[SvdParams], entry=SVD):
    """ΔW_k = argmin_{rank ≤ k} ‖X − Σ w_i B_i A_i‖_F (Eckart–Young), k = ``rank`` or max r_i.

    The sum is formed exactly by concatenation ([w_1 B_1 … w_n B_n][A_1; …; A_n]); its SVD comes from a
    QR of the stacked B, a QR of the stacked Aᵀ and an SVD of the small (Σr)×(Σr) core
    (:func:`mergekit_lora.lowrank.truncate`), in float64.  PEFT's ``svd`` computes the same ΔW_k (the
    truncation is unique when σ_k > σ_{k+1}) but through a dense d_out×d_in full SVD per module with
    the base model and all adapters in memory; its factors are (U S, Vᵀ), ours are balanced (U √S, √S Vᵀ).
    """

    def merge_module(self, units: list[RankUnits], weights: list[float], params: SvdParams,
                     ctx: ModuleContext) -> MergedModule:
        total = RankUnits.concat([u.scaled(w) for u, w in zip(units, weights)])
        out, s = truncate_with_spectrum(total, params.rank or max(u.rank for u in units))
        # the fidelity row from the spectrum: no N×N Gram of the target (grows with the inputs squared)
        k = out.rank
        t2, m2, e2 = (float(s.square().sum()), float(s[:k].square().sum()), float(s[k:].square().sum()))
        return MergedModule(out, fidelity=ModuleFidelity(ctx.name, t2**0.5, m2**0.5, e2**0.5))
