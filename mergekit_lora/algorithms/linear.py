"""``linear``: task arithmetic Σ w_i ΔW_i, exact, by concatenation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_lora.fidelity import exact_fidelity
from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext

from .catalog import LINEAR
from .params import LinearParams

if TYPE_CHECKING:
    from mergekit_lora.units import RankUnits


class Linear(Algorithm[LinearParams], entry=LINEAR):
    """Exact weighted sum: ΔW = Σ w_i B_i A_i = [w_1 B_1 … w_n B_n][A_1; …; A_n].

    Unlike PEFT's ``linear`` (which averages A's and B's separately, so the product carries cross
    terms B_i A_j, PEFT #3004), this is the weighted sum of the updates themselves.  The output rank
    is Σ r_i, or ``rank`` when given (best rank-k approximation of the sum, Eckart–Young).  Without
    ``rank`` it only scales and concatenates factors, so it runs on numpy ``ArrayUnits`` too.
    """

    def runs_on_arrays(self, params: LinearParams) -> bool:
        return params.rank is None  # a rank-k truncation is an SVD: torch

    def merge_module(self, units: list[RankUnits], weights: list[float], params: LinearParams,
                     ctx: ModuleContext) -> MergedModule:
        total = type(units[0]).concat([u.scaled(w) for u, w in zip(units, weights)])
        if params.rank is not None and params.rank < total.rank:
            from mergekit_lora.lowrank import truncate  # lazily: torch (the exact sum runs on numpy too)

            return MergedModule(truncate(total, params.rank))
        return MergedModule(total, fidelity=exact_fidelity(ctx.name, total))  # exact: the error is 0 by construction
