"""One merge, its module batches as Ray tasks; the driver streams the results in module order.

The driver cuts the plan into the local driver's merge batches (:func:`core.plan_batches`), packs
consecutive batches into tasks of about ``modules_per_task`` modules and keeps at most
``2 × workers`` tasks in flight.  A worker loads the inputs' headers once per process (cached by
the source list), reads only its modules' tensors (byte ranges), merges them with
:func:`core.merge_batch_list` and returns the merged factors on the CPU.  Results are consumed in
submission order, so the writer sees the same modules in the same order as a local run: same bytes.

Workers must see the inputs under the same paths as the driver (a shared filesystem, or the same
Hub cache on every node).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_lora.adapter import Adapter
from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.merge import progress_bar
from mergekit_lora.preflight import MergePlan
from mergekit_lora.registry import Algorithm, AlgorithmParams
from mergekit_lora.units import RankUnits

from . import core
from .session import ensure_ray


@dataclass(frozen=True)
class RayOptions:
    """``address``: a Ray cluster (default ``$RAY_ADDRESS``, else local Ray); ``workers``: CPUs of a
    local Ray (default: all); ``modules_per_task``: modules merged per Ray task."""

    address: str | None = None
    workers: int | None = None
    modules_per_task: int = 16


_INPUTS: dict[Any, core.Inputs] = {}  # per worker process: inputs loaded once per source list


def _worker_inputs(sources: Sequence[Any], missing: str, load_options: dict[str, Any] | None) -> core.Inputs:
    key = (tuple(str(s) if not isinstance(s, Adapter) else id(s) for s in sources), missing,
           tuple(sorted((load_options or {}).items())))
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = core.load_inputs(sources, missing, load_options)  # type: ignore[arg-type]
    return _INPUTS[key]


def merge_task(sources: Sequence[Any], missing: str, load_options: dict[str, Any] | None, method: str,
               batches: list[core.Batch], weights: list[float], seed: int, device: str,
               prepare_params: AlgorithmParams) -> list[tuple[str, RankUnits, ModuleFidelity | None]]:
    """The body of one Ray task (plain function: also callable without Ray)."""
    inputs = _worker_inputs(sources, missing, load_options)
    return core.merge_batch_list(inputs, method, batches, weights, seed=seed, device=device,
                                 prepare_params=prepare_params)


def pack(batches: Sequence[core.Batch], modules_per_task: int) -> list[list[core.Batch]]:
    """Consecutive batches grouped into tasks of at least ``modules_per_task`` modules (the last may be short)."""
    tasks: list[list[core.Batch]] = []
    cur: list[core.Batch] = []
    n = 0
    for b in batches:
        cur.append(b)
        n += len(b[0])
        if n >= modules_per_task:
            tasks.append(cur)
            cur, n = [], 0
    if cur:
        tasks.append(cur)
    return tasks


def ray_merge_modules(sources: Sequence[Any], adapters: Sequence[Adapter], algorithm: Algorithm,
                      params: AlgorithmParams, weights: Sequence[float], plan: MergePlan, options: RayOptions, *,
                      missing: str = "union", load_options: dict[str, Any] | None = None,
                      device: torch.device, seed: int = 0, fidelity: list[ModuleFidelity] | None = None,
                      progress: bool = False, overrides=None) -> Iterator[tuple[str, RankUnits]]:
    """Same contract as :func:`mergekit_lora.merge.merge_modules`, the batches merged by Ray tasks."""
    ray = ensure_ray(options.address, options.workers)
    inputs = core.Inputs(list(adapters), plan)
    tasks = pack(core.plan_batches(inputs, algorithm, params, weights, overrides), max(1, options.modules_per_task))
    remote = ray.remote(merge_task).options(num_cpus=1, num_gpus=1 if device.type == "cuda" else 0,
                                            max_retries=1)
    src_ref = ray.put(list(sources))
    window = 2 * max(1, int(ray.available_resources().get("CPU", 1)))
    pending: deque = deque()
    it = iter(tasks)
    with progress_bar(progress) as bar:
        bar_task = bar.add_task(f"merging ({algorithm.name}, Ray)", total=len(plan.modules))
        while True:
            while len(pending) < window:
                nxt = next(it, None)
                if nxt is None:
                    break
                pending.append(remote.remote(src_ref, missing, load_options, algorithm.name, nxt, list(weights),
                                             seed, str(device), params))
            if not pending:
                break
            for name, units, row in ray.get(pending.popleft()):
                if fidelity is not None and row is not None:
                    fidelity.append(row)
                yield name, units
                bar.advance(bar_task)
