"""One merge, its module batches as Ray tasks; the driver streams the results in module order.

The driver cuts the plan into the local driver's merge batches (:func:`core.plan_batches`), packs
consecutive batches into tasks of about ``modules_per_task`` modules and keeps at most
``2 × CPUs`` tasks in flight.  The plan (headers only, a few KB per input) travels once through the
object store; a worker reads only its modules' tensors (byte ranges), merges them with
:func:`core.merge_batch_list` and returns the merged factors, fidelity rows and notes on the CPU.
Results are consumed in submission order, so the writer sees the same modules in the same order as a
local run: same bytes, same card.

Workers must see the inputs under the same paths as the driver (a shared filesystem, or the same
Hub cache on every node).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.pipeline import MergePlan
from mergekit_lora.progress import progress_bar
from mergekit_lora.registry import Notes
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


def merge_task(p: MergePlan, batches: list[list[str]]
               ) -> list[tuple[str, RankUnits, ModuleFidelity | None, Notes | None]]:
    """The body of one Ray task (a plain function: also callable without Ray)."""
    return core.merge_batch_list(p, batches)


def pack(batches: Sequence[list[str]], modules_per_task: int) -> list[list[list[str]]]:
    """Consecutive batches grouped into tasks of at least ``modules_per_task`` modules (the last may be short)."""
    tasks: list[list[list[str]]] = []
    cur: list[list[str]] = []
    n = 0
    for b in batches:
        cur.append(b)
        n += len(b)
        if n >= modules_per_task:
            tasks.append(cur)
            cur, n = [], 0
    if cur:
        tasks.append(cur)
    return tasks


def ray_stream(options: RayOptions) -> Callable[..., Iterator[tuple[str, Any]]]:
    """A drop-in for :func:`mergekit_lora.pipeline.merge_stream` that merges on Ray."""

    def stream(p: MergePlan, rows: list[ModuleFidelity] | None = None,
               notes: list[tuple[str, Notes]] | None = None) -> Iterator[tuple[str, Any]]:
        ray = ensure_ray(options.address, options.workers)
        tasks = pack(core.plan_batches(p), max(1, options.modules_per_task))
        remote = ray.remote(merge_task).options(num_cpus=1, num_gpus=1 if str(p.device).startswith("cuda") else 0,
                                                max_retries=1)
        plan_ref = ray.put(p)
        window = 2 * max(1, int(ray.available_resources().get("CPU", 1)))
        pending: deque = deque()
        it = iter(tasks)
        with progress_bar(p.options.progress) as bar:
            bar_task = bar.add_task(f"merging ({p.method}, Ray)", total=len(p.modules))
            while True:
                while len(pending) < window:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    pending.append(remote.remote(plan_ref, nxt))
                if not pending:
                    break
                for name, units, row, note in ray.get(pending.popleft()):
                    if rows is not None and row is not None:
                        rows.append(row)
                    if notes is not None and note:
                        notes.append((name, note))
                    yield name, units
                    bar.advance(bar_task)

    return stream
