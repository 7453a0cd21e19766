"""Writing a planned merge: the format's writer inside an atomic folder, the model card, recipe, artifacts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import checks
from ..adapter import Adapter
from ..atomic import atomic_output
from ..card import CardInfo, SourceInfo, render_card
from ..fidelity import ModuleFidelity, summarize
from ..formats.registry import get_writer
from ..hub import push_folder
from ..registry import Notes
from ..sources import assumed_alpha
from .plan import MergePlan


def write_output(plan: MergePlan, modules: Iterable[tuple[str, Any]], rows: list[ModuleFidelity],
                 notes: list[tuple[str, Notes]], *, writer_options: Mapping[str, Any] | None = None,
                 extra: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Write ``modules`` (consumed here, in plan order) and the card into ``plan.options.out``; return the config.

    ``writer_options`` go to the format's writer as keywords; ``extra(tmp)`` adds files to the temporary folder
    before the swap (calibrated routing: the static export) — every output folder is written here."""
    opts = plan.options
    assert opts.out is not None
    spec = get_writer(plan.output_format)
    assert spec.write is not None
    algo = plan.algorithm
    modules = checks.finite_units(modules, plan.out_dtype)  # issue 14: finite before the rename
    with atomic_output(Path(opts.out), opts.force) as tmp:
        config = spec.write(tmp, modules, list(plan.adapters), dtype=plan.out_dtype,
                            target_modules=plan.target_modules, method=plan.method,
                            recipe={"params": plan.params.model_dump(), "weights": list(plan.weights),
                                    "seed": opts.seed},
                            module_names=[m.name for m in plan.modules], profile=opts.profile,
                            base_gguf=opts.base_gguf, **(writer_options or {}))
        if extra is not None:
            extra(tmp)
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
