"""The one place where Ray work and ``tune`` touch the merge core: the pipeline's plan/execute.

:func:`make_plan` plans a merge (every check, headers only), :func:`merged_units` executes a plan in
memory (nothing written), :func:`plan_batches` gives the plan's merge batches in the order the local
driver merges them, :func:`batch_costs` their work estimated from the headers, and :func:`merge_batch_list` merges a list of those batches exactly as the local
driver does.  A Ray task runs :func:`merge_batch_list` in a worker on the pickled plan, so local and
Ray runs compute the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergekit_lora.adapter import Adapter
from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.options import make_options
from mergekit_lora.pipeline import MergePlan, execute, merge_stream, plan
from mergekit_lora.pipeline.execute import merge_batches
from mergekit_lora.registry import Notes
from mergekit_lora.request import MergeRequest
from mergekit_lora.units import RankUnits

Source = str | Path | Adapter


def make_plan(request: MergeRequest) -> MergePlan:
    return plan(request)


def merged_units(p: MergePlan, params: Mapping[str, Any] | None = None,
                 weights: Sequence[float] | None = None, scale: str | None = None) -> dict[str, RankUnits]:
    """Module name -> merged units (CPU), nothing written.  ``params``/``weights``/``scale`` re-plan the
    same inputs (already read: headers are not read again) with other settings."""
    if params is not None or weights is not None or scale is not None:
        opts = make_options(p.options, out=None, **({"scale": scale} if scale is not None else {}))
        p = plan(MergeRequest(sources=list(p.adapters), method=p.method,
                              params=params if params is not None else p.params,
                              weights=list(weights if weights is not None else p.weights), options=opts))
    elif p.options.out is not None:
        p = replace(p, options=make_options(p.options, out=None))
    merged = execute(p).merged
    assert merged is not None
    return merged


def plan_batches(p: MergePlan) -> list[list[str]]:
    """The plan's merge batches (module names) in the order the local driver merges them."""
    return [[mp.name for mp in batch] for batch in merge_batches(p)]


def batch_costs(p: MergePlan, batches: Sequence[Sequence[str]]) -> list[int]:
    """The work of each batch, estimated from the headers: the input factors' elements,
    Σ_modules Σ_inputs rank·(d_in + d_out) (what is read; the merge's work grows with it)."""
    by_name = {mp.name: mp for mp in p.modules}
    costs = []
    for names in batches:
        c = 0
        for n in names:
            for i in by_name[n].present:
                info = p.adapters[i].modules[n]
                c += info.rank * (info.d_in + info.d_out)
        costs.append(c)
    return costs


def merge_batch_list(p: MergePlan, batches: Sequence[Sequence[str]]
                     ) -> list[tuple[str, RankUnits, ModuleFidelity | None, Notes | None]]:
    """Merge each batch as the local driver does: (module, units on CPU, fidelity row, notes) in order."""
    by_name = {mp.name: mp for mp in p.modules}
    out = []
    for names in batches:
        sub = replace(p, modules=tuple(by_name[n] for n in names))
        rows: list[ModuleFidelity] = []
        notes: list[tuple[str, Notes]] = []
        got = list(merge_stream(sub, rows, notes))
        row_of = {r.name: r for r in rows}
        notes_of = dict(notes)
        out += [(name, u, row_of.get(name), notes_of.get(name)) for name, u in got]
    return out
