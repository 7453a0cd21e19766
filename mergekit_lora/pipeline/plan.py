"""``plan()``: every check of a merge request, once, before any tensor is read.

A plan is built from the sources' headers only.  In order: the options and the method's parameters
(no I/O), then the sources (local paths or Hub ids; headers read), then everything that needs the
inputs together — one module naming (the format registry's aligners), one base model and family,
equal shapes, the output format and dtype, and each module's parameters and weights (recipe
overrides and layer gradients resolved).  Problems of one stage are raised together
(:class:`~mergekit_lora.errors.PlanErrors`); each names its field (an option name or a request path
such as ``adapters[1].source``) so that recipes can point at their YAML line.

Example::

    p = plan(MergeRequest(sources=["a", "b"], method="svd", params={"rank": 8}, weights=[0.5, 0.5],
                          options=MergeOptions(out="merged")))
    [m.name for m in p.modules][:2], p.output_format
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import checks
from ..adapter import Adapter, ModuleInfo
from ..atomic import check_output
from ..devices import device_name, resolve_device, resolve_dtype  # noqa: F401  (resolve_device: re-exported)
from ..errors import LoraMergeError, raise_all
from ..formats import load_adapter
from ..formats.peft_write import carried_target_modules
from ..formats.registry import align_names, default_output_format, formats, get_writer
from ..formats.safetensors_header import content_fingerprints
from ..names import layer_index, matches
from ..options import MergeOptions
from ..recipe.gradients import at, evaluate, gradient_fields
from ..registry import Algorithm, AlgorithmEntry, AlgorithmParams, get_entry, parse_params
from ..request import MergeRequest, ModuleOverride
from ..strength import Scale, parse_scale
from .compat import check_compatible

Source = str | Path | Adapter


@dataclass(frozen=True)
class ModulePlan:
    """One output module: which inputs hold it, its header facts, its parameters and weights."""

    name: str
    present: tuple[int, ...]
    info: ModuleInfo
    params: AlgorithmParams
    weights: tuple[float, ...]  # one per input
    layer: int | None = None
    t: float = 0.0  # relative layer position in [0, 1] (gradients)
    override: int | None = None  # index of the override that matched


@dataclass(frozen=True)
class MergePlan:
    """Everything ``execute`` needs; built by :func:`plan`, never by hand."""

    method: str
    algorithm: Algorithm
    params: AlgorithmParams  # the request's parameters at t = 0 (what the card lists)
    weights: tuple[float, ...]  # the request's weights at t = 0
    options: MergeOptions
    adapters: tuple[Adapter, ...]
    labels: tuple[str, ...]
    modules: tuple[ModulePlan, ...]
    partial: tuple[str, ...]
    base_model: str | None
    output_format: str
    out_dtype: str  # "bfloat16", "float32", … (a name: planning imports no torch)
    device: str  # "cpu", "cuda", "cuda:1"
    target_modules: list[str] | None
    recipe: str | None = None  # the request as YAML, written beside the output
    scale: Scale = Scale()  # the resolved strength (routed outputs: already folded into the weights)
    matched: Mapping[int, int] = field(default_factory=dict)  # override index -> modules matched
    card_sections: tuple[tuple[str, str], ...] = ()  # a caller's own card sections (tune's search summary)


def plan(request: MergeRequest) -> MergePlan:
    """Check a merge request completely and decide what ``execute`` will do (headers only).

    The request's ``params`` and ``weights`` may hold layer gradients (lists) and its ``overrides``
    per-module values, as a recipe gives them; its ``base_model`` (optional) must match the inputs'
    recorded base.  Raises :class:`LoraMergeError` (or ``PlanErrors``) naming every problem of the first
    stage that has any.
    """
    sources, method, params, weights = request.sources, request.method, request.params, request.weights
    opts, overrides, base_model, recipe = request.options, request.overrides, request.base_model, request.recipe
    # Stage 1: the request itself (no I/O).
    problems: list[LoraMergeError] = []
    entry = _collect(problems, get_entry, method)  # the class (torch) loads after the header checks
    device = _collect(problems, device_name, opts.device)
    if not sources:
        problems.append(LoraMergeError("no input adapters given", field="adapters"))
    _collect(problems, checks.weight_count, weights, len(sources))
    if opts.output_format is not None:
        _collect(problems, get_writer, opts.output_format)
    if entry is not None and entry.output_format and opts.output_format and opts.output_format != entry.output_format:
        problems.append(LoraMergeError(
            f"method {method!r} writes the {entry.output_format!r} format, not {opts.output_format!r}; drop "
            "«output_format» (a routed adapter can be exported as a static one: route's export_static)",
            field="output_format"))
    _reliability_request(problems, sources, params, weights, overrides, opts)  # issue 14 (before: stats the path)
    if opts.out is not None and not any(p.field == "out" for p in problems):
        _collect(problems, check_output, Path(opts.out), opts.force)
    finite = not any(p.field == "parameters" for p in problems)  # a NaN/Inf parameter is reported once, above
    top = _collect(problems, _top_params, entry, params) if entry is not None and finite else None
    raise_all(problems)
    assert entry is not None and device is not None and top is not None
    # Stage 2: the sources' headers.
    adapters, labels = _load_sources(sources, opts)
    if opts.out is not None:  # issue 14: hub sources are local files only now
        checks.output_not_input(opts.out, [q for a in adapters if a.path is not None
                                           for q in checks.input_locations(a.path)])
    # Stage 3: the inputs together.
    adapters = align_names(adapters)
    if base_model:
        _check_base(base_model, adapters, labels)
    shared = check_compatible(adapters, opts.missing)
    fmt = entry.output_format or opts.output_format or default_output_format(adapters)
    spec = get_writer(fmt)
    refusal = spec.refuse_inputs(adapters) if spec.refuse_inputs is not None else None
    if refusal:
        raise LoraMergeError(refusal, field="output_format")
    _check_writer_options(fmt, opts)
    w = list(weights) if weights is not None else [1.0 / len(adapters)] * len(adapters)
    scale = parse_scale(entry.default_scale if opts.scale == "auto" else opts.scale)
    if entry.output_format is not None and not scale.is_identity:  # routed: every unit kept, scale the weights
        c = scale.weight_factor([float(at(x, 0.0)) for x in w])
        w, scale = [_times(x, c) for x in w], Scale()
    algo = entry.load()()  # every check above ran without torch
    modules, matched = _module_table(algo, params, w, overrides, adapters, shared.names, shared.present)
    targets = carried_target_modules([a.meta for a in adapters], [a.module_names() for a in adapters],
                                     [m.name for m in modules])
    return MergePlan(
        method=method, algorithm=algo, params=top, weights=tuple(float(at(x, 0.0)) for x in w), options=opts,
        adapters=tuple(adapters), labels=tuple(labels), modules=tuple(modules), partial=tuple(shared.partial),
        base_model=shared.base_model, output_format=fmt, out_dtype=resolve_dtype(opts.dtype, adapters),
        device=device, target_modules=targets, recipe=recipe, scale=scale, matched=matched)


def _times(x: Any, c: float) -> Any:
    """A weight (a number or a layer gradient) times c."""
    return [v * c for v in x] if isinstance(x, (list, tuple)) else x * c


def _reliability_request(problems: list[LoraMergeError], sources: Sequence[Source], params: Any,
                         weights: Sequence[Any] | None, overrides: Sequence[ModuleOverride], opts: MergeOptions) -> None:
    """Issue 14 (:mod:`mergekit_lora.checks`): finite weights/parameters (gradients and overrides too),
    and an output that is no input and can be created."""
    if weights is not None:
        _collect(problems, checks.finite_numbers, "weights", list(weights))
    if params is not None:
        _collect(problems, checks.finite_numbers, "parameters", params)
    for i, o in enumerate(overrides):
        _collect(problems, checks.finite_numbers, f"modules[{i}].parameters", dict(o.parameters or {}))
        if o.weights is not None:
            _collect(problems, checks.finite_numbers, f"modules[{i}].weights", list(o.weights))
    if opts.out is not None:
        _collect(problems, checks.output_not_input, opts.out, [s for s in sources if not isinstance(s, Adapter)])
        _collect(problems, checks.output_path_ok, opts.out)


def _check_writer_options(fmt: str, opts: MergeOptions) -> None:
    """Options that only another output format takes, then what this one needs (its FormatSpec's hooks)."""
    for other in formats():
        for name in other.options if other.name != fmt else ():
            if getattr(opts, name) != MergeOptions.model_fields[name].default:
                raise LoraMergeError(f"«{name}» is for output format {other.name}, not {fmt}", field=name)
    spec = get_writer(fmt)
    if spec.check_options is not None:
        spec.check_options(opts)


def _collect(problems: list[LoraMergeError], fn: Any, *args: Any) -> Any:
    """Call ``fn``; a LoraMergeError becomes a problem (and None the result)."""
    try:
        return fn(*args)
    except LoraMergeError as e:
        problems.append(e)
        return None


def _top_params(algo: AlgorithmEntry | Algorithm, params: Mapping[str, Any] | AlgorithmParams | None) -> AlgorithmParams:
    """The request's parameters at layer position 0 (validated; gradients interpolated)."""
    if isinstance(params, AlgorithmParams):
        return params
    return parse_params(algo, evaluate(gradient_fields(algo, dict(params or {})), 0.0))


def _load_sources(sources: Sequence[Source], opts: MergeOptions) -> tuple[list[Adapter], list[str]]:
    problems: list[LoraMergeError] = []
    adapters: list[Adapter] = []
    labels: list[str] = []
    for i, s in enumerate(sources):
        if isinstance(s, Adapter):
            adapters.append(s)
            labels.append(s.label)
            continue
        try:
            with content_fingerprints(opts.verify_inputs):  # issue 28
                adapters.append(load_adapter(s, allow_pickle=opts.allow_pickle,
                                             ignore_modules_to_save=opts.ignore_modules_to_save))
            labels.append(str(s))
        except LoraMergeError as e:
            problems.append(LoraMergeError(e.template, field=f"adapters[{i}].source"))
    raise_all(problems)
    return adapters, labels


def _check_base(base_model: str, adapters: Sequence[Adapter], labels: Sequence[str]) -> None:
    want = base_model.rstrip("/").lower()
    problems = [LoraMergeError(f"the recipe says {base_model} but adapters[{i}] ({labels[i]}) was trained on "
                               f"{a.meta.base_model}; fix base_model or the input", field="base_model")
                for i, a in enumerate(adapters)
                if a.meta.base_model and a.meta.base_model.rstrip("/").lower() != want]
    raise_all(problems)


def _module_table(algo: Algorithm, params: Mapping[str, Any] | AlgorithmParams | None, weights: list[Any],
                  overrides: Sequence[ModuleOverride], adapters: Sequence[Adapter], names: list[str],
                  present: Mapping[str, tuple[int, ...]]) -> tuple[list[ModulePlan], dict[int, int]]:
    """Each module's parameters and weights: first matching override, gradients at the module's layer."""
    layers = [layer_index(n) for n in names]
    n_layers = max((x for x in layers if x is not None), default=0) + 1
    fixed = params if isinstance(params, AlgorithmParams) else None
    top = {} if fixed is not None else dict(params or {})
    cache: dict[tuple[Any, ...], AlgorithmParams] = {}
    matched = {i: 0 for i in range(len(overrides))}
    out: list[ModulePlan] = []
    problems: list[LoraMergeError] = []
    for name, layer in zip(names, layers):
        t = 0.0 if layer is None or n_layers < 2 else layer / (n_layers - 1)
        idx = next((i for i, o in enumerate(overrides) if matches(o.match, name)), None)
        values, w = dict(top), list(weights)
        if idx is not None:
            matched[idx] += 1
            values.update(overrides[idx].parameters)
            if overrides[idx].weights is not None:
                w = list(overrides[idx].weights)  # type: ignore[arg-type]
        if fixed is not None and idx is None:
            p = fixed
        else:
            base = fixed.model_dump(by_alias=True) if fixed is not None else {}
            concrete = evaluate(gradient_fields(algo, {**base, **values}), t)
            key = tuple(sorted((k, repr(v)) for k, v in concrete.items()))
            if key not in cache:
                try:
                    cache[key] = parse_params(algo, concrete)
                except LoraMergeError as e:
                    problems.append(e)
                    cache[key] = algo.Params.model_construct()
            p = cache[key]
        holders = present[name]
        out.append(ModulePlan(name, holders, adapters[holders[0]].modules[name], p,
                              tuple(float(at(x, t)) for x in w), layer, t, idx))
    for mp in out:
        why = algo.check_module(mp.name, [adapters[i].modules[mp.name] for i in mp.present], mp.params)
        if why:
            problems.append(LoraMergeError(why, field="params"))
            if len(problems) >= 5:  # enough to act on; the rest are the same kind
                break
    for i, count in matched.items():
        if count == 0:
            problems.append(LoraMergeError(
                f"{overrides[i].match!r} matches no module of the inputs; fix the pattern or remove the override "
                "(see `loramerge inspect --modules`)", field=f"modules[{i}].match"))
    raise_all(problems)
    return out, matched
