"""``execute(plan)``: stream the plan's modules through the algorithm, batch by batch, and write.

Inputs are read per batch and dropped, so memory is bounded by one batch, not by the model.  With
``options.out`` the result goes through the output format's writer into a temp folder that replaces
the output atomically (with its model card, recipe and the algorithm's artifacts); without it the
merged modules are kept in memory (``MergeResult.merged``), e.g. for evaluation or search.

Torch only where it computes: when the method runs on numpy factors for the plan's parameters
(``Algorithm.runs_on_arrays``: ``linear``, ``cat``), every input is a safetensors file, the strength is
the identity and the output format's writer takes arrays, a merge written to disk reads, merges and
writes :class:`~mergekit_lora.factor_arrays.ArrayUnits` and never imports torch (the same bytes).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraMergeError
from ..factor_arrays import ArrayUnits
from ..fidelity import ModuleFidelity, module_fidelity, summarize, weighted_target
from ..formats.registry import get_writer
from ..progress import progress_bar
from ..registry import MergedModule, ModuleContext, Notes
from ..strength import Scale
from .output import push_output, write_output
from .plan import MergePlan, ModulePlan

if TYPE_CHECKING:
    from ..units import RankUnits


@dataclass
class MergeResult:
    """What a merge did: output folder (or None), module count, fidelity per group, seconds, details."""

    out: Path | None
    modules: int
    fidelity: dict[str, dict[str, float]]
    seconds: float
    rows: list[ModuleFidelity] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    merged: dict[str, Any] | None = None  # name -> merged units, when nothing was written


def execute(plan: MergePlan, stream_fn: Any = None) -> MergeResult:
    """Merge as planned; write to ``plan.options.out`` (atomically) or keep the modules in memory.

    ``stream_fn``: a drop-in for :func:`merge_stream` (``distributed.ray_merge.ray_stream``: Ray tasks)."""
    t0 = time.perf_counter()
    rows: list[ModuleFidelity] = []
    notes: list[tuple[str, Notes]] = []
    if stream_fn is not None:
        stream = stream_fn(plan, rows, notes)  # issue 16 hook
    else:  # written to disk: numpy factors where the method allows (in memory, callers want torch units)
        stream = merge_stream(plan, rows, notes, arrays=plan.options.out is not None)
    merged: dict[str, Any] | None = None
    config: dict[str, Any] = {}
    out = plan.options.out
    if out is None:
        merged = dict(stream)
    else:
        config = write_output(plan, stream, rows, notes)
        if plan.options.push_to_hub:
            push_output(plan)
    report = plan.algorithm.report(notes, plan.params)
    if not plan.scale.is_identity:
        report = {"strength": plan.scale.describe(), **report}
    return MergeResult(Path(out) if out is not None else None, len(plan.modules), summarize(rows),
                       time.perf_counter() - t0, rows, config, report, merged)


def runs_on_arrays(plan: MergePlan) -> bool:
    """Whether this plan can merge on numpy factors: the method says so for every module's parameters, every
    input reads them (safetensors files), the strength is the identity and the writer takes them."""
    return (plan.scale.is_identity and all(a.has_arrays for a in plan.adapters)
            and get_writer(plan.output_format).arrays
            and all(plan.algorithm.runs_on_arrays(mp.params) for mp in plan.modules))


def merge_stream(plan: MergePlan, rows: list[ModuleFidelity] | None = None,
                 notes: list[tuple[str, Notes]] | None = None, *, arrays: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (module, merged units on the CPU) in batch order; append fidelity rows and notes as they come.

    A module missing from an input counts as ΔW = 0 for that input.  The fidelity row is the
    algorithm's own when it has one, else the factor-space error against Σ w_i ΔW_i (routed modules
    have no single ΔW and get no row).  ``arrays``: numpy :class:`ArrayUnits` where :func:`runs_on_arrays`
    allows (no torch), else torch :class:`RankUnits`.
    """
    on_arrays = arrays and runs_on_arrays(plan)
    with _policy(plan, on_arrays), progress_bar(plan.options.progress) as bar:
        task = bar.add_task(f"merging ({plan.method})", total=len(plan.modules))
        batches = ((b, *_merge_arrays(plan, b)) for b in merge_batches(plan)) if on_arrays else _merged_tensors(plan)
        for batch, loaded, weights, outs in batches:
            for mp, u, w, m in zip(batch, loaded, weights, outs):
                units, row = m.units, m.fidelity
                static = on_arrays or _is_rank_units(units)
                if static and not plan.scale.is_identity:
                    units, row = apply_scale(plan.scale, mp.name, units, row, u, w, plan.weights)
                if rows is not None and static:
                    rows.append(row if row is not None else module_fidelity(mp.name, units, weighted_target(u, w)))
                if notes is not None and m.notes:
                    notes.append((mp.name, m.notes))
                yield mp.name, units if on_arrays else units.to("cpu")
                bar.advance(task)


def _policy(plan: MergePlan, on_arrays: bool) -> AbstractContextManager[Any]:
    """The thread policy around torch work (numpy concatenation has no threads to set)."""
    if on_arrays:
        return nullcontext()
    from ..threads import thread_policy  # lazily: torch

    return thread_policy(plan.options.threads)


def _is_rank_units(units: Any) -> bool:
    from ..units import RankUnits  # lazily: the torch path only

    return isinstance(units, RankUnits)


def _merge_arrays(plan: MergePlan, batch: list[ModulePlan]) -> tuple[list, list, list[MergedModule]]:
    """One batch on numpy factors; an array method gives its own (exact) fidelity rows."""
    loaded = [[plan.adapters[i].arrays(mp.name, source=i) for i in mp.present] for mp in batch]
    outs = _call(plan, batch, loaded)
    for m in outs:
        if not isinstance(m.units, ArrayUnits) or m.fidelity is None:
            raise TypeError(f"method {plan.method!r} runs on arrays but returned no ArrayUnits with a fidelity row")
    return loaded, [[mp.weights[i] for i in mp.present] for mp in batch], outs


def _merged_tensors(plan: MergePlan) -> Iterator[tuple[list[ModulePlan], list, list, list[MergedModule]]]:
    """(batch, inputs read, weights, merged modules) per merge batch, on torch tensors on the plan's device.

    Read ahead: when the thread budget gives two or more workers (CPU), the next batch is read
    (``algorithm.load_batch``, one thread) on a second thread while this one is merged; while it reads, that
    thread counts as busy (``ThreadBudget.busy``), so the merge's pools get one worker fewer (with 2 threads:
    one reads, one merges, instead of three busy threads on two cores).  Reading never
    depends on merging, so the bytes are those of reading in turn; a read's error surfaces when its batch
    comes, after the batches before it are merged, as without reading ahead."""
    import torch  # lazily: only the methods that compute load it

    from ..threads import PARALLEL_MIN_FLOPS, Busy, ThreadBudget, current  # lazily, with torch

    budget, device = current(), torch.device(plan.device)  # the budget goes to the algorithms in their context

    def read(batch: list[ModulePlan], reader: ThreadBudget) -> tuple[list[ModuleContext], list]:
        ctxs = _contexts(plan, batch, device, budget)
        return ctxs, plan.algorithm.load_batch([[(plan.adapters[i], i) for i in mp.present] for mp in batch],
                                               batch[0].params, _contexts(plan, batch, device, reader),
                                               [[mp.weights[i] for i in mp.present] for mp in batch])

    batches = merge_batches(plan)
    if device.type != "cpu" or budget.workers_for(PARALLEL_MIN_FLOPS) < 2:
        for batch in batches:
            yield batch, *_merge_tensors(plan, batch, *read(batch, budget))
        return
    busy = Busy()
    budget = ThreadBudget(budget.budget, budget.load_aware, busy)  # less the reader while it reads

    def read_ahead(batch: list[ModulePlan]) -> tuple[list[ModuleContext], list]:
        with busy.hold():
            return read(batch, ThreadBudget(1))

    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as ahead:
        nxt = next(batches, None)
        job = ahead.submit(read_ahead, nxt) if nxt is not None else None
        while job is not None:
            batch, (ctxs, loaded) = nxt, job.result()
            nxt = next(batches, None)
            job = ahead.submit(read_ahead, nxt) if nxt is not None else None
            yield batch, *_merge_tensors(plan, batch, ctxs, loaded)


def _merge_tensors(plan: MergePlan, batch: list[ModulePlan], ctxs: list[ModuleContext], loaded: list
                   ) -> tuple[list, list, list[MergedModule]]:
    """One batch read on torch tensors, merged; a linear-algebra failure is one sentence."""
    import torch  # lazily: only the methods that compute load it

    try:
        outs = _call(plan, batch, loaded, ctxs)
    except torch.linalg.LinAlgError as e:  # issue 28: one sentence, never a traceback
        raise LoraMergeError(f"method {plan.method!r} could not merge module {batch[0].name}"
                             f"{f' (and {len(batch) - 1} more)' if len(batch) > 1 else ''}: "
                             f"{str(e).splitlines()[0]}; check the inputs' values (or try another method)"
                             ) from None
    return loaded, [[mp.weights[i] for i in mp.present] for mp in batch], outs


def _contexts(plan: MergePlan, batch: list[ModulePlan], device: Any = "cpu", budget: Any = None) -> list[ModuleContext]:
    return [ModuleContext(mp.name, plan.options.seed, device) if budget is None
            else ModuleContext(mp.name, plan.options.seed, device, budget) for mp in batch]


def _call(plan: MergePlan, batch: list[ModulePlan], loaded: list, ctxs: list[ModuleContext] | None = None
          ) -> list[MergedModule]:
    weights = [[mp.weights[i] for i in mp.present] for mp in batch]
    ctxs = ctxs if ctxs is not None else _contexts(plan, batch)
    if len(batch) == 1:
        return [plan.algorithm.merge_module(loaded[0], weights[0], batch[0].params, ctxs[0])]
    return plan.algorithm.merge_batch(loaded, weights, batch[0].params, ctxs)


def apply_scale(scale: Scale, name: str, merged: RankUnits, row: ModuleFidelity | None, units: list[RankUnits],
                weights: list[float], all_weights: Sequence[float]) -> tuple[RankUnits, ModuleFidelity]:
    """One module's merged units at the plan's strength, and their fidelity row against Σ wᵢ ΔWᵢ.

    The reference norm of ``average`` is ‖Σ wᵢ ΔWᵢ‖ / Σ|w| over *all* inputs' weights (a module missing
    from an input counts as ΔW = 0 there); the row is updated exactly from ⟨m, t⟩ = (m² + t² − e²)/2.
    """
    if row is None or not math.isfinite(row.target_norm):
        row = module_fidelity(name, merged, weighted_target(units, weights))
    average = row.target_norm / (sum(abs(w) for w in all_weights) or 1.0)
    c = scale.norm_factor(row.merged_norm, average, len(all_weights))
    if c == 1.0:
        return merged, row
    m, t = row.merged_norm, row.target_norm
    inner = (m * m + t * t - row.error_norm**2) / 2
    e2 = max(c * c * m * m - 2 * c * inner + t * t, 0.0)
    return merged.scaled(c), ModuleFidelity(name, t, c * m, math.sqrt(e2))


def merge_batches(plan: MergePlan) -> Iterator[list[ModulePlan]]:
    """The plan cut into merge batches: plan order for one-at-a-time algorithms; otherwise modules grouped
    by (inputs present, weights, params, every input's rank/shape/kind/dtype) in order of first
    appearance, each group in chunks of ``batch_limit``."""
    groups: dict[tuple, list[ModulePlan]] = {}
    for mp in plan.modules:
        limit = plan.algorithm.batch_limit(mp.params)
        if limit <= 1:
            yield [mp]
            continue
        infos = [plan.adapters[i].modules[mp.name] for i in mp.present]
        w = tuple(mp.weights[i] for i in mp.present)
        key = (mp.present, w, mp.params, tuple((f.rank, f.d_out, f.d_in, f.kind, f.dtype) for f in infos))
        members = groups.setdefault(key, [])
        members.append(mp)
        if len(members) >= limit:
            yield list(members)
            members.clear()
    for members in groups.values():
        if members:
            yield members
