"""The streaming merge driver: pre-flight, one module at a time, write atomically.

``merge()`` is the public function behind ``loramerge merge`` (and ``cluster``, ``run``): the CLI
parses flags, this does the work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .adapter import Adapter
from .atomic import atomic_output, check_output
from .card import CardInfo, SourceInfo, render_card
from .errors import LoraMergeError
from .fidelity import (
    ModuleFidelity,
    declares_exact,
    exact_fidelity,
    module_fidelity,
    summarize,
    weighted_target,
)
from .formats import load_adapter
from .formats.peft_write import carried_target_modules
from .formats.writers import WRITERS, default_output_format, write_adapter
from .preflight import MergePlan, MissingPolicy, ModulePlan, align_names, check_compatible, check_missing
from .registry import Algorithm, AlgorithmParams, ModuleContext, get_algorithm, parse_params
from .threads import thread_policy
from .units import RankUnits

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without CUDA is an error, not a fallback."""
    d = str(device)
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise LoraMergeError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    if d not in ("cpu",) and not d.startswith("cuda"):
        raise LoraMergeError(f"unknown device {d!r}; use auto, cpu or cuda")
    return torch.device(d)


def resolve_dtype(dtype: str | torch.dtype | None, adapters: Sequence[Adapter]) -> torch.dtype:
    """The output dtype: the requested one, else the inputs' (promoted if they differ)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        if dtype not in DTYPES:
            raise LoraMergeError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}")
        return DTYPES[dtype]
    out = adapters[0].meta.dtype
    for a in adapters[1:]:
        out = torch.promote_types(out, a.meta.dtype)
    return out


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise LoraMergeError(f"got {len(weights)} weights for {n} adapters; give one weight per adapter")
    return [float(w) for w in weights]


@dataclass
class MergeResult:
    out: Path | None
    modules: int
    fidelity: dict[str, dict[str, float]]
    seconds: float
    rows: list[ModuleFidelity] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True, disable=not enabled)


# Per-module overrides (recipes): module name -> (params, weights for all inputs).
ModuleOverride = Callable[[str], tuple[AlgorithmParams, Sequence[float]]]


def merge_modules(adapters: Sequence[Adapter], algorithm: Algorithm, params: AlgorithmParams,
                  weights: Sequence[float], plan: MergePlan, *, device: torch.device, seed: int = 0,
                  fidelity: list[ModuleFidelity] | None = None, progress: bool = False,
                  overrides: ModuleOverride | None = None) -> Iterator[tuple[str, RankUnits]]:
    """Yield (module, merged units) batch by batch; inputs are read per batch and dropped.

    A module missing from an input counts as ΔW = 0 for that input.  When ``fidelity`` is a list,
    each module's error against Σ w_i ΔW_i is appended to it (factor space, cheap).  ``overrides``
    gives per-module parameters and weights (recipes); default: ``params`` and ``weights`` everywhere.
    Algorithms with ``batch_limit > 1`` get modules of identical shapes, weights and parameters
    together (grouped across layers from the file headers, so a batch can fill up), at most
    ``batch_limit`` at a time: memory stays bounded by the batch, not the number of layers.
    """
    algorithm.prepare(adapters, weights, params)
    with thread_policy(None), progress_bar(progress) as bar:  # [perf] issue 15: thread policy (mergekit_lora/threads.py)
        task = bar.add_task(f"merging ({algorithm.name})", total=len(plan.modules))
        for batch, p in _batches(adapters, algorithm, params, weights, plan, overrides):
            loaded = [([adapters[i].units(mp.name, source=i).to(device) for i in mp.present], w)
                      for mp, w in batch]
            ctxs = [ModuleContext(mp.name, seed, device) for mp, _ in batch]
            if len(batch) == 1:
                outs = [algorithm.merge_module(loaded[0][0], loaded[0][1], p, ctxs[0])]
            else:
                outs = algorithm.merge_batch([u for u, _ in loaded], [w for _, w in loaded], p, ctxs)
            for (mp, _), (u, w), merged in zip(batch, loaded, outs):
                if fidelity is not None and isinstance(merged, RankUnits):  # routed modules have no single ΔW
                    row = algorithm.known_fidelity(mp.name)
                    if row is None and declares_exact(algorithm, p):  # [perf] issue 15: known-zero error
                        row = exact_fidelity(mp.name, weighted_target(u, w))
                    fidelity.append(row if row is not None else module_fidelity(mp.name, merged, weighted_target(u, w)))
                yield mp.name, merged.to("cpu")
                bar.advance(task)


def _batches(adapters: Sequence[Adapter], algorithm: Algorithm, params: AlgorithmParams, weights: Sequence[float],
             plan: MergePlan, overrides: ModuleOverride | None
             ) -> Iterator[tuple[list[tuple[ModulePlan, list[float]]], AlgorithmParams]]:
    """The plan cut into merge batches: plan order for one-at-a-time algorithms; otherwise modules
    grouped by (inputs present, weights, params, every input's rank/shape/kind/dtype) in order of first
    appearance, each group in chunks of ``batch_limit``."""
    groups: dict[tuple, tuple[list[tuple[ModulePlan, list[float]]], AlgorithmParams]] = {}
    for mp in plan.modules:
        p, all_w = overrides(mp.name) if overrides else (params, weights)
        w = [float(all_w[i]) for i in mp.present]
        limit = algorithm.batch_limit(p)
        if limit <= 1:
            yield [(mp, w)], p
            continue
        infos = [adapters[i].modules[mp.name] for i in mp.present]
        key = (mp.present, tuple(w), p, tuple((f.rank, f.d_out, f.d_in, f.kind, f.dtype) for f in infos))
        members, _ = groups.setdefault(key, ([], p))
        members.append((mp, w))
        if len(members) >= limit:
            yield list(members), p
            members.clear()
    for members, p in groups.values():
        if members:
            yield members, p


def merge(
    sources: Sequence[str | Path | Adapter],
    method: str,
    out: str | Path | None,
    *,
    weights: Sequence[float] | None = None,
    params: dict[str, Any] | AlgorithmParams | None = None,
    missing: MissingPolicy = "union",
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    force: bool = False,
    output_format: str | None = None,
    progress: bool = False,
    recipe: str | None = None,
    card_sections: list[tuple[str, str]] | None = None,
    load_options: dict[str, Any] | None = None,
    overrides: ModuleOverride | None = None,
) -> MergeResult:
    """Merge ``sources`` with ``method`` and write the result to ``out`` (atomically), with a model card.

    Every check that can fail on user input (method, parameters, weights, output exists, adapters
    compatible) runs before the first tensor is read.
    """
    t0 = time.perf_counter()
    check_missing(missing)
    algo = get_algorithm(method)
    p = params if isinstance(params, AlgorithmParams) else parse_params(algo, dict(params or {}))
    if out is not None:
        check_output(Path(out), force)
    dev = resolve_device(device)
    adapters = align_names([s if isinstance(s, Adapter) else load_adapter(s, **(load_options or {})) for s in sources])
    w = check_weights(weights, len(adapters))
    plan = check_compatible(adapters, missing)
    out_dtype = resolve_dtype(dtype, adapters)
    fmt = output_format or algo.output_format or default_output_format(adapters)
    if algo.output_format and fmt != algo.output_format:
        raise LoraMergeError(f"method {method!r} writes the {algo.output_format!r} format, not {fmt!r}; "
                             "drop --format (see `loramerge route --export-static` for a static adapter)")
    if fmt not in WRITERS:
        raise LoraMergeError(f"unknown output format {fmt!r}; available: {', '.join(sorted(WRITERS))}")
    rows: list[ModuleFidelity] = []
    stream = merge_modules(adapters, algo, p, w, plan, device=dev, seed=seed, fidelity=rows, progress=progress,
                           overrides=overrides)
    config: dict[str, Any] = {}
    if out is None:
        for _ in stream:
            pass
    else:
        targets = carried_target_modules([a.meta for a in adapters], [a.module_names() for a in adapters],
                                         [m.name for m in plan.modules])
        with atomic_output(Path(out), force) as tmp:
            config = write_adapter(fmt, tmp, stream, adapters, dtype=out_dtype, target_modules=targets,
                                   method=method, recipe={"params": p.model_dump(), "weights": w, "seed": seed},
                                   module_names=[m.name for m in plan.modules])
            summary = summarize(rows)
            sections = list(card_sections or []) + _report_section(algo.report())
            card = CardInfo(
                method=method, params=p.model_dump(by_alias=True), seed=seed, base_model=plan.base_model,
                sources=[SourceInfo(str(s if not isinstance(s, Adapter) else s.label), wi,
                                    a.meta.extra.get("resolved_revision") or a.meta.revision,
                                    _rank_summary(a)) for s, a, wi in zip(sources, adapters, w)],
                fidelity=summary, recipe=recipe, extra_sections=sections + algo.card_sections(),
                library_name={"peft": "peft", "routed": "mergekit-lora"}.get(fmt, "diffusers"),
            )
            (tmp / "README.md").write_text(render_card(card))
            if recipe:
                (tmp / "recipe.yaml").write_text(recipe)
            for fname, text in algo.artifacts().items():
                (tmp / fname).write_text(text)
    return MergeResult(Path(out) if out else None, len(plan.modules), summarize(rows),
                       time.perf_counter() - t0, rows, config, algo.report())


def _report_section(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The algorithm's own numbers (Algorithm.report) as a card section, when it has any."""
    if not report:
        return []
    return [("Algorithm report", "\n".join(f"- {k}: {v:.3e}" if isinstance(v, float) else f"- {k}: {v}"
                                            for k, v in report.items()))]


def _rank_summary(a: Adapter) -> str:
    ranks = sorted({i.rank for i in a.modules.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
