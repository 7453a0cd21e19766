"""The one place where Ray work and ``tune`` touch the merge core (re-pointed at the pipeline later).

Everything here is plain Python (no Ray): :func:`load_inputs` gives the aligned adapters and the
merge plan, :func:`merged_units` merges in memory (no output written), :func:`plan_batches` cuts
the plan into the same merge batches as the local driver, and :func:`merge_batch_list` merges a
list of those batches.  A Ray task calls :func:`merge_batch_list` in a worker; the local driver
and the worker run the very same code on the same batches, so the bytes are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_lora.adapter import Adapter
from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.formats import load_adapter
from mergekit_lora.merge import _batches, check_weights, merge_modules
from mergekit_lora.preflight import MergePlan, MissingPolicy, ModulePlan, align_names, check_compatible
from mergekit_lora.registry import Algorithm, AlgorithmParams, get_algorithm, parse_params
from mergekit_lora.units import RankUnits

Source = str | Path | Adapter


@dataclass(frozen=True)
class Inputs:
    """Aligned adapters and their merge plan (headers only: no tensor has been read)."""

    adapters: list[Adapter]
    plan: MergePlan


def load_inputs(sources: Sequence[Source], missing: MissingPolicy = "union",
                load_options: dict[str, Any] | None = None) -> Inputs:
    adapters = align_names([s if isinstance(s, Adapter) else load_adapter(s, **(load_options or {}))
                            for s in sources])
    return Inputs(adapters, check_compatible(adapters, missing))


def resolve_params(method: str, params: dict[str, Any] | AlgorithmParams | None) -> tuple[Algorithm, AlgorithmParams]:
    algo = get_algorithm(method)
    p = params if isinstance(params, AlgorithmParams) else parse_params(algo, dict(params or {}))
    return algo, p


def merged_units(inputs: Inputs, method: str, params: dict[str, Any] | AlgorithmParams | None,
                 weights: Sequence[float] | None, *, seed: int = 0,
                 device: torch.device | str = "cpu") -> dict[str, RankUnits]:
    """Module name -> merged units (on the CPU), nothing written: what ``merge`` would write."""
    algo, p = resolve_params(method, params)
    w = check_weights(weights, len(inputs.adapters))
    return dict(merge_modules(inputs.adapters, algo, p, w, inputs.plan, device=torch.device(device), seed=seed))


# One merge batch as it travels to a worker: the modules (plans) with the weights of their present inputs.
Batch = tuple[list[tuple[ModulePlan, list[float]]], AlgorithmParams]


def plan_batches(inputs: Inputs, algo: Algorithm, params: AlgorithmParams, weights: Sequence[float],
                 overrides=None) -> list[Batch]:
    """The plan cut into the local driver's merge batches, in the order it merges them."""
    return list(_batches(inputs.adapters, algo, params, list(weights), inputs.plan, overrides))


def merge_batch_list(inputs: Inputs, method: str, batches: Sequence[Batch], weights: Sequence[float], *,
                     seed: int, device: torch.device | str, prepare_params: AlgorithmParams
                     ) -> list[tuple[str, RankUnits, ModuleFidelity | None]]:
    """Merge each batch exactly as the local driver does; (module, units on CPU, fidelity row) in order."""
    algo = get_algorithm(method)
    algo.prepare(inputs.adapters, list(weights), prepare_params)
    out: list[tuple[str, RankUnits, ModuleFidelity | None]] = []
    n = len(inputs.adapters)
    for members, p in batches:
        sub = MergePlan([mp for mp, _ in members], [], inputs.plan.base_model)
        per_module = {mp.name: _full_weights(mp, w, n) for mp, w in members}
        rows: list[ModuleFidelity] = []
        merged = merge_modules(inputs.adapters, algo, p, list(weights), sub, device=torch.device(device),
                               seed=seed, fidelity=rows, overrides=lambda name, _p=p, _w=per_module: (_p, _w[name]))
        got = list(merged)
        by_name = {r.name: r for r in rows}
        out += [(name, u, by_name.get(name)) for name, u in got]
    return out


def _full_weights(mp: ModulePlan, w: list[float], n: int) -> list[float]:
    full = [0.0] * n
    for i, wi in zip(mp.present, w):
        full[i] = wi
    return full
