"""Every output: a planned merge (the format's writer inside an atomic folder, the model card, recipe,
artifacts, a caller's second output such as calibrated routing's ``static/``) and a one-file export.

This is the one module that opens an output through :mod:`mergekit_lora.atomic` (import contract
``one-writer``, ``tests/test_layers.py``); writers get a typed :class:`WriteRequest` and their format's own
options from its ``FormatSpec.write_options`` hook, so nothing here names a format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checks
from ..adapter import Adapter
from ..atomic import atomic_file, atomic_output
from ..card import CardInfo, SourceInfo, render_card
from ..errors import LoraMergeError
from ..fidelity import ModuleFidelity, summarize
from ..formats import load_adapter
from ..formats.registry import FormatSpec, WriteRequest, get_writer
from ..hub import push_folder
from ..registry import Notes
from ..sources import assumed_alpha
from .plan import MergePlan

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SubOutput:
    """A second output inside the output folder, ``OUT/folder``, written by format ``output_format``'s writer
    (calibrated routing's ``static/``: a PEFT adapter).  ``options``: that writer's own options (None: its
    defaults)."""

    folder: str
    output_format: str
    modules: Iterable[tuple[str, Any]]
    dtype: torch.dtype
    method: str = ""
    options: Any = None


def write_output(plan: MergePlan, modules: Iterable[tuple[str, Any]], rows: list[ModuleFidelity],
                 notes: list[tuple[str, Notes]], *, format_options: Any = None,
                 also: Sequence[SubOutput] = ()) -> dict[str, Any]:
    """Write ``modules`` (consumed here, in plan order) and the card into ``plan.options.out``; return the config.

    ``format_options``: the writer's own options when the caller has them (calibrated routing's), else the
    format's ``write_options`` hook builds them from ``plan.options``; ``also``: second outputs written into
    the same temporary folder before the swap."""
    opts = plan.options
    assert opts.out is not None
    spec = get_writer(plan.output_format)
    if format_options is None and spec.write_options is not None:
        format_options = spec.write_options(opts)
    algo = plan.algorithm
    request = WriteRequest(
        Path(), checks.finite_units(modules, plan.out_dtype), plan.adapters, plan.out_dtype,  # finite: issue 14
        method=plan.method, target_modules=plan.target_modules, module_names=[m.name for m in plan.modules],
        recipe={"params": plan.params.model_dump(), "weights": list(plan.weights), "seed": opts.seed},
        options=format_options)
    with atomic_output(Path(opts.out), opts.force) as tmp:
        config = _write(spec, replace(request, out_dir=tmp))
        for sub in also:
            (tmp / sub.folder).mkdir()
            _write(get_writer(sub.output_format),
                   WriteRequest(tmp / sub.folder, checks.finite_units(sub.modules, sub.dtype), plan.adapters,
                                sub.dtype, method=sub.method, options=sub.options))
        sections = (report_section(algo.report(notes, plan.params)) + algo.card_sections(notes, plan.params)
                    + list(plan.card_sections))  # inside the atomic folder: the card is whole when it appears
        if note := assumed_alpha(plan.labels, plan.adapters):  # issue 23: never a silent loss of strength
            sections.append(("Input notes", note))
        if not plan.scale.is_identity:  # the strength policy (mergekit_lora.strength): what `energy` below means
            sections.insert(0, ("Strength", f"`scale: {plan.scale}` — {plan.scale.describe()}. The fidelity table's "
                                            "energy ratio is ‖ΔW‖² against Σ wᵢ ΔWᵢ with the weights above."))
        card = CardInfo(
            method=plan.method, params=plan.params.model_dump(by_alias=True), seed=opts.seed,
            base_model=plan.base_model, sources=source_rows(plan.labels, plan.adapters, plan.weights),
            fidelity=summarize(rows), recipe=plan.recipe, extra_sections=sections,
            library_name=spec.library,
        )
        (tmp / "README.md").write_text(render_card(card))
        if plan.recipe:
            (tmp / "recipe.yaml").write_text(plan.recipe)
        for fname, content in algo.artifacts(notes, plan.params, [a.label for a in plan.adapters]).items():
            if isinstance(content, bytes):
                (tmp / fname).write_bytes(content)
            else:
                (tmp / fname).write_text(content)
    return config


def output_folder(out: str | Path, force: bool = False) -> AbstractContextManager[Path]:
    """An output folder that is not a merge (``eval compare``'s report): a temp folder that replaces ``out``
    when the block succeeds (:func:`mergekit_lora.atomic.atomic_output`)."""
    return atomic_output(Path(out), force)


def output_file(out: str | Path, force: bool = False) -> AbstractContextManager[Path]:
    """A one-file output that is not an adapter (a picture): yields the temp path to write; it replaces ``out``
    when the block succeeds (:func:`mergekit_lora.atomic.atomic_file`)."""
    return _file_in(Path(out), force)


@contextmanager
def _file_in(out: Path, force: bool) -> Iterator[Path]:
    with atomic_file(out, out.name, force) as tmp:
        yield tmp / out.name


def export(adapter: Adapter | str | Path, out: str | Path, output_format: str, options: Any = None, *,
           dtype: torch.dtype | None = None, force: bool = False) -> dict[str, Any]:
    """Convert one adapter (or anything ``load_adapter`` reads) into a one-file format (its ``FormatSpec.file``) written to the file ``out``,
    atomically (a temp folder beside it, the file renamed into place); return the writer's summary with
    ``file`` = ``out``.  ``options``: the format's own options (e.g. ``formats.gguf.GGUFOptions``);
    ``dtype`` None: the adapter's dtype.  Every factor is checked finite first."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    spec = get_writer(output_format)
    if spec.file is None:
        raise LoraMergeError(f"output format {output_format!r} is a folder, not one file; write it with merge "
                             "(«output_format»)", field="output_format")
    dtype = dtype or adapter.meta.dtype
    with atomic_file(Path(out), spec.file, force) as tmp:
        config = _write(spec, WriteRequest(tmp, checks.finite_units(adapter.iter_units(), dtype), [adapter], dtype,
                                           options=options))
    return {**config, "file": str(out)}


def _write(spec: FormatSpec, request: WriteRequest) -> dict[str, Any]:
    if spec.write is None:
        raise LoraMergeError(f"output format {spec.name!r} cannot be written", field="output_format")
    return spec.write(request)


def push_output(plan: MergePlan) -> str:
    o = plan.options
    assert o.out is not None and o.push_to_hub is not None
    return push_folder(o.out, o.push_to_hub, private=o.private, revision=o.revision, commit_message=o.commit_message)


def source_rows(labels: Sequence[str], adapters: Sequence[Adapter], weights: Sequence[float]) -> list[SourceInfo]:
    """The card's input table: label, weight, resolved revision, rank summary."""
    return [SourceInfo(lab, w, a.meta.extra.get("resolved_revision") or a.meta.revision, _rank_summary(a))
            for lab, a, w in zip(labels, adapters, weights)]


def report_section(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The algorithm's own numbers (Algorithm.report) as a card section, when it has any."""
    if not report:
        return []
    return [("Algorithm report", "\n".join(f"- {k}: {v:.3e}" if isinstance(v, float) else f"- {k}: {v}"
                                            for k, v in report.items()))]


def _rank_summary(a: Adapter) -> str:
    ranks = sorted({i.rank for i in a.modules.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
