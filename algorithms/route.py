"""``route``: keep every rank unit of every input and route over them per token (FlyLoRA / SMoRA style).

The result is a routed adapter (format ``routed``), not a static LoRA: run it with
:func:`mergekit_lora.runtime.attach`, or export a static merge with ``loramerge route --export-static``.
Calibration of the gate needs a base model and data, so it lives in :func:`mergekit_lora.routing.route`;
this algorithm is the training-free part (also usable from recipes as ``method: route``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.names import pattern_value
from mergekit_lora.registry import Algorithm, AlgorithmParams, MergedModule, ModuleContext
from mergekit_lora.routing.format import RoutedUnits
from mergekit_lora.routing.routers import init_gate
from mergekit_lora.units import RankUnits


class RouteParams(AlgorithmParams):
    router: Literal["implicit", "gate"] = Field("implicit", description="implicit (|a·x|·‖b‖, training-free) or gate")
    top_k: int = Field(..., ge=1, description="active units per token (capped at a module's unit count R)")
    top_k_pattern: dict[str, int] = Field(default_factory=dict,
                                          description="per-module top-k: module name suffix or regex -> k")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the gate router's weights")


class Route(Algorithm[RouteParams]):
    """Pool the weighted units of all inputs per module; a router activates top-k of them per token.

    With top_k >= R and the implicit router the routed model equals the ``cat`` merge exactly.
    """

    name = "route"
    description = "rank routing: pool all units, activate the top-k per token (routed adapter + runtime)"
    Params = RouteParams
    output_format = "routed"

    def merge_module(self, units: list[RankUnits], weights: list[float], params: RouteParams,
                     ctx: ModuleContext) -> MergedModule:
        for u in units:
            if u.kind != "linear":
                raise LoraMergeError(f"module {ctx.name} is a {u.kind} LoRA; routing supports linear (and GPT-2 "
                                     "Conv1D) modules only; drop it from the inputs or use a static method")
        pooled = RankUnits.concat([u.scaled(w) for u, w in zip(units, weights)])
        k = pattern_value(params.top_k_pattern, ctx.name, params.top_k)
        if not isinstance(k, int) or k < 1:
            raise LoraMergeError(f"top_k_pattern gives {k!r} for module {ctx.name}; use a positive integer")
        k = min(k, pooled.rank)
        gate = init_gate(pooled) if params.router == "gate" else None
        return MergedModule(RoutedUnits(pooled, params.router, k, params.temperature,
                                        torch.zeros(pooled.rank, dtype=torch.float32), gate))
