"""``route``: keep every rank unit of every input and route over them per token (FlyLoRA / SMoRA style).

The result is a routed adapter (format ``routed``), not a static LoRA: run it with
:func:`mergekit_lora.routing.runtime.attach`, or export a static merge with ``loramerge route --export-static``.
Calibration of the gate needs a base model and data, so it lives in :func:`mergekit_lora.routing.route`;
this algorithm is the training-free part (also usable from recipes as ``method: route``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_lora.adapter import ModuleInfo
from mergekit_lora.formats.routed import RoutedUnits
from mergekit_lora.names import pattern_value
from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext
from mergekit_lora.routing.routers import init_gate
from mergekit_lora.units import RankUnits

from .catalog import ROUTE
from .params import RouteParams


class Route(Algorithm[RouteParams], entry=ROUTE):
    """Pool the weighted units of all inputs per module; a router activates top-k of them per token.

    With top_k >= R and the implicit router the routed model equals the ``cat`` merge exactly.  The
    hierarchical router's profiles are fitted afterwards (``routing.profile.fit_profiles``); without
    them it routes like the implicit router.
    """

    def check_module(self, name: str, infos: Sequence[ModuleInfo], params: RouteParams) -> str | None:
        kinds = {i.kind for i in infos} - {"linear"}
        if kinds:
            return (f"module {name} is a {kinds.pop()} LoRA; routing supports linear (and GPT-2 Conv1D) modules "
                    "only; drop it from the inputs or use a static method")
        k = pattern_value(params.top_k_pattern, name, params.top_k or 1)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            return f"top_k_pattern gives {k!r} for module {name}; use a positive integer"
        return None

    def merge_module(self, units: list[RankUnits], weights: list[float], params: RouteParams,
                     ctx: ModuleContext) -> MergedModule:
        pooled = RankUnits.concat([u.scaled(w) for u, w in zip(units, weights)])
        default_k = params.top_k or max(1, max(u.rank for u in units) // 2)
        k = min(pattern_value(params.top_k_pattern, ctx.name, default_k), pooled.rank)
        gate = init_gate(pooled) if params.router == "gate" else None
        return MergedModule(RoutedUnits(pooled, params.router, k, params.temperature,
                                        torch.zeros(pooled.rank, dtype=torch.float32), gate, top_m=params.top_m,
                                        mass=params.mass, evidence=params.evidence))
