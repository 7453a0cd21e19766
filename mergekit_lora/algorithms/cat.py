"""``cat``: stack the weighted rank units of all inputs (output rank Σ r_i)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_lora.fidelity import exact_fidelity
from mergekit_lora.registry import Algorithm, AlgorithmParams, MergedModule, ModuleContext

if TYPE_CHECKING:
    from mergekit_lora.units import RankUnits

from .catalog import CAT


class Cat(Algorithm[AlgorithmParams], entry=CAT):
    """Concatenation [w_1 B_1 … w_n B_n][A_1; …; A_n]: the FLoRA stacking aggregation.

    Same ΔW as PEFT's ``cat`` combination (which also concatenates, putting w_i and the scale on A_i
    where we fold them into B_i); the output rank is Σ r_i and every input unit is kept verbatim.
    """

    def runs_on_arrays(self, params: AlgorithmParams) -> bool:
        return True  # scaling and concatenation only: numpy ArrayUnits as well as RankUnits

    def merge_module(self, units: list[RankUnits], weights: list[float], params: AlgorithmParams,
                     ctx: ModuleContext) -> MergedModule:
        total = type(units[0]).concat([u.scaled(w) for u, w in zip(units, weights)])
        return MergedModule(total, fidelity=exact_fidelity(ctx.name, total))  # exact: the error is 0 by construction
