"""One merge, its module batches as Ray tasks on warm merge workers; the driver streams the results in module order.

The driver cuts the plan into the local driver's merge batches (:func:`core.plan_batches`) and groups
consecutive batches into tasks of about equal work (:func:`cut`, work estimated from the headers:
:func:`core.batch_costs`), ``TASKS_PER_WORKER`` tasks per worker so that a slow worker (a shared
machine) leaves a short tail, while each task is large enough that its round trip (≈ 5–10 ms) is
amortised.  The plan (headers only, a few KB per input) is put once in the object store and loaded
once by each worker; the workers are actors (:mod:`.merge_pool`) that import torch once and merge many
tasks — kept warm across calls when the merge joins a running cluster (``address``).  A worker reads
only its modules' tensors (byte ranges) and returns the merged factors, fidelity rows and notes on the
CPU.  Results are yielded in task order, so the writer sees the same modules in the same order as a
local run: same bytes, same card.  A worker that dies mid-task is replaced and its task retried once.

A local Ray started by the merge is shut down when the merge ends (no process is left behind).
Workers must see the inputs under the same paths as the driver (a shared filesystem, or the same
Hub cache on every node).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.pipeline import MergePlan
from mergekit_lora.progress import progress_bar
from mergekit_lora.registry import Notes

from . import core
from .merge_pool import MergePool, loaded
from .session import ensure_ray, import_ray

TASKS_PER_WORKER = 4  # tasks per worker: a slow worker's tail ≤ ~1/4 of its share
DEPTH = 2  # tasks queued on a worker at once, so it never waits for the driver's round trip
KEEP_S = 300.0  # idle seconds before a kept (cluster) worker releases its CPU


@dataclass(frozen=True)
class RayOptions:
    """``address``: a running Ray cluster (default ``$RAY_ADDRESS``, else a local Ray started for the
    merge and shut down after it); ``workers``: merge workers (default: the cluster's CPUs);
    ``modules_per_task``: fixed task size (default: from the plan's work, ``TASKS_PER_WORKER`` tasks per
    worker); ``keep_s``: idle seconds the workers stay warm for the next merge (default ``KEEP_S`` when
    joining a cluster, 0 = per call)."""

    address: str | None = None
    workers: int | None = None
    modules_per_task: int | None = None
    keep_s: float | None = None


@dataclass
class RayStats:
    """What the last Ray merge did: Ray start (≈ 0 when it was running), workers, reused warm workers,
    tasks, retried tasks, the seconds until the first result came back (start + cold start + first
    task), the workers' process ids and CPU seconds (a fresh worker's from its start: cold start
    included; a reused one's from this merge's plan load)."""

    ray_start_s: float = 0.0
    workers: int = 0
    reused: int = 0
    tasks: int = 0
    retried: int = 0
    first_result_s: float = 0.0
    worker_pids: list[int] = field(default_factory=list)
    worker_cpu_s: float = 0.0


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


def cut(batches: Sequence[list[str]], costs: Sequence[int], parts: int) -> list[list[list[str]]]:
    """Consecutive batches grouped into at most ``parts`` tasks of about equal total cost (whole batches;
    a batch dearer than a share is a task of its own)."""
    total = float(sum(costs)) or 1.0
    tasks: list[list[list[str]]] = []
    cur: list[list[str]] = []
    acc = 0.0
    for b, c in zip(batches, costs):
        cur.append(b)
        acc += c
        if acc >= total * (len(tasks) + 1) / parts - 1e-9 * total:
            tasks.append(cur)
            cur = []
    if cur:
        tasks.append(cur)
    return tasks


def cluster_cpus(ray: Any) -> int:
    """The cluster's CPUs (all of them: a kept pool's own workers hold some while idle)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayMerge:
    """A drop-in for :func:`mergekit_lora.pipeline.merge_stream` that merges on Ray; ``stats`` describes
    the last merge."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.stats = RayStats()

    def __call__(self, p: MergePlan, rows: list[ModuleFidelity] | None = None,
                 notes: list[tuple[str, Notes]] | None = None) -> Iterator[tuple[str, Any]]:
        self.stats = RayStats()
        t0 = time.perf_counter()
        was_up = import_ray().is_initialized()
        address = self.options.address or os.environ.get("RAY_ADDRESS") or None
        ray = ensure_ray(address, self.options.workers)
        self.stats.ray_start_s = time.perf_counter() - t0
        keep = self.options.keep_s if self.options.keep_s is not None else (KEEP_S if address else 0.0)
        try:
            yield from self._run(ray, p, rows, notes, keep, t0)
        finally:
            if not was_up:
                ray.shutdown()

    def _tasks(self, p: MergePlan, batches: list[list[str]], workers: int) -> list[list[list[str]]]:
        if self.options.modules_per_task:
            return pack(batches, max(1, self.options.modules_per_task))
        return cut(batches, core.batch_costs(p, batches), workers * TASKS_PER_WORKER)

    def _run(self, ray: Any, p: MergePlan, rows: list[ModuleFidelity] | None, notes: list[tuple[str, Notes]] | None,
             keep: float, t0: float) -> Iterator[tuple[str, Any]]:
        batches = core.plan_batches(p)
        workers = max(1, min(self.options.workers or cluster_cpus(ray), len(batches)))
        pool = MergePool(ray, workers, idle_s=keep or None, gpu=str(p.device).startswith("cuda"))
        tasks = self._tasks(p, batches, workers)
        self.stats.workers, self.stats.reused, self.stats.tasks = workers, pool.reused, len(tasks)
        token = uuid.uuid4().hex
        plan_ref = ray.put(p)
        at_load = loaded(pool, token, plan_ref)
        try:
            with progress_bar(p.options.progress) as bar:
                bar_task = bar.add_task(f"merging ({p.method}, Ray)", total=len(p.modules))
                for result in self._schedule(ray, pool, token, plan_ref, tasks):
                    if not self.stats.first_result_s:
                        self.stats.first_result_s = time.perf_counter() - t0
                    for name, units, row, note in result:
                        if rows is not None and row is not None:
                            rows.append(row)
                        if notes is not None and note:
                            notes.append((name, note))
                        yield name, units
                        bar.advance(bar_task)
            warm = list(pool.warm)
            before = ray.get(at_load) if not self.stats.retried else [(0, 0.0)] * len(warm)
            now = pool.usage()
            self.stats.worker_pids = [pid for pid, _ in now]
            self.stats.worker_cpu_s = sum(c - (b if w else 0.0) for (_, c), (_, b), w in zip(now, before, warm))
        finally:
            pool.close(token)

    def _schedule(self, ray: Any, pool: MergePool, token: str, plan_ref: Any,
                  tasks: list[list[list[str]]]) -> Iterator[list[Any]]:
        """Each task's result, in task order; tasks go to the least busy worker (≤ ``DEPTH`` queued each)."""
        n = len(pool.actors)
        queued = [0] * n
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (task, slot)
        done: dict[int, list[Any]] = {}
        retried: set[int] = set()
        nxt = out = 0
        window = n * (DEPTH + 2)  # results held for ordering at most

        def submit(i: int, slot: int) -> None:
            inflight[pool.actors[slot].merge.remote(token, tasks[i])] = (i, slot)
            queued[slot] += 1

        while out < len(tasks):
            while nxt < len(tasks) and nxt - out < window and min(queued) < DEPTH:
                submit(nxt, queued.index(min(queued)))
                nxt += 1
            if out in done:
                yield done.pop(out)
                out += 1
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            i, slot = inflight.pop(ready[0])
            queued[slot] -= 1
            try:
                done[i] = ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                if i in retried:
                    raise LoraMergeError(f"a Ray merge worker died twice on the same modules ({tasks[i][0][0]} …): "
                                         f"{str(e).strip().splitlines()[-1][:300]}") from None
                retried.add(i)
                self.stats.retried += 1
                pool.replace(slot)
                loaded(pool, token, plan_ref, [slot])
                for ref, (j, s) in list(inflight.items()):  # its other queued task died with it
                    if s == slot:
                        del inflight[ref]
                        queued[slot] -= 1
                        submit(j, slot)
                submit(i, slot)


def ray_stream(options: RayOptions) -> RayMerge:
    """A drop-in for :func:`mergekit_lora.pipeline.merge_stream` that merges on Ray."""
    return RayMerge(options)
