"""YAML merge recipes: the schema, and validation that reports every problem at once.

A recipe is mergekit-like, but for adapters::

    method: linear
    base_model: org/base            # optional; checked against the inputs
    adapters:
      - {source: org/lora-a@v1.2, weight: 1.0}
      - {source: ./b.safetensors, weight: [1.0, 0.5]}   # a layer gradient
    parameters: {rank: 16}          # validated by the method's own Params model
    modules:                        # per-module overrides, first match wins
      - {match: "*.mlp.*", parameters: {rank: 8}}
      - {match: "re:layers\\.[0-3]\\.", weights: [1.0, 0.5]}
    output: {path: ./merged, format: peft, dtype: bfloat16, push_to_hub: org/merged, private: true}
    seed: 0

:func:`validate_recipe` checks everything that needs no tensor and no header (schema, method,
parameters, weights counts, output, token for a push); the pipeline's ``plan`` then reads headers,
checks the inputs and resolves per-module parameters, and its problems are reported at the recipe's
lines too (:mod:`mergekit_lora.pipeline.recipe_plan`).  Each problem is ``path (line N): what to do``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..checks import check_output, weight_count
from ..errors import LoraMergeError, not_finite
from ..hub import env_token, parse_hub_id
from ..options import MergeOptions, check_device, check_dtype
from ..paths import path_fits
from ..registry import available, unknown_method
from ..sources import missing_source
from ..strength import normalize_scale
from .gradients import check_parameters
from .problems import Problems
from .yaml_lines import Loc, format_loc, load_yaml_with_lines, read_text_utf8

GRADIENT_HELP = "a number or a list of at least two numbers (a layer gradient)"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_NOT_FINITE = "not a finite number"  # the schema's marker; reported in the one wording of errors.not_finite


def _gradient(v: Any) -> float | list[float]:
    values = v if isinstance(v, list) else [v]
    if any(isinstance(x, float) and not math.isfinite(x) for x in values):
        raise ValueError(_NOT_FINITE)
    if _is_number(v):
        return float(v)
    if isinstance(v, list) and len(v) >= 2 and all(_is_number(x) for x in v):
        return [float(x) for x in v]
    raise ValueError(f"expected {GRADIENT_HELP}")


Gradient = Annotated[Any, AfterValidator(_gradient)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class AdapterSpec(_Strict):
    source: str
    weight: Gradient | None = None  # None: 1/n (every command's default: the average)


class ModuleSpec(_Strict):
    match: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    weights: list[Gradient] | None = None


class OutputSpec(_Strict):
    path: str
    format: str | None = None
    dtype: str | None = None
    profile: Literal["default", "portable"] = "default"
    base_gguf: str | None = None
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


class Recipe(_Strict):
    """A serialised merge request: the inputs, the method and its parameters, overrides and options."""

    method: str
    base_model: str | None = None
    adapters: list[AdapterSpec] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    modules: list[ModuleSpec] = Field(default_factory=list)
    output: OutputSpec
    seed: int = 0
    scale: Annotated[str | float, AfterValidator(normalize_scale)] = "auto"
    missing: Literal["union", "intersection", "error"] = "union"
    device: str = "auto"
    allow_pickle: bool = False
    ignore_modules_to_save: bool = False
    verify_inputs: bool = False

    def weights(self) -> list[Any] | None:
        """The adapters' weights for ``plan`` (an adapter without one gets 1/n; None: all 1/n)."""
        if all(a.weight is None for a in self.adapters):
            return None
        n = len(self.adapters)
        return [a.weight if a.weight is not None else 1.0 / n for a in self.adapters]

    @classmethod
    def from_yaml(cls, text: str, name: str = "recipe", *, force: bool = False, check_token: bool = True) -> Recipe:
        """Parse and validate (every problem at once, with YAML lines)."""
        return validate_recipe(text, name, force=force, check_token=check_token)[0]

    def to_yaml(self) -> str:
        """YAML in a fixed key order: weights and seed always, everything else only when it is not the default."""
        doc: dict[str, Any] = {"method": self.method}
        if self.base_model:
            doc["base_model"] = self.base_model
        doc["adapters"] = [a.model_dump(exclude_none=True) for a in self.adapters]
        if self.parameters:
            doc["parameters"] = dict(self.parameters)
        if self.modules:
            doc["modules"] = [m.model_dump(exclude_defaults=True) for m in self.modules]
        doc["output"] = {"path": self.output.path, **self.output.model_dump(exclude_defaults=True)}
        doc["seed"] = self.seed
        for key, default in (("scale", "auto"), ("missing", "union"), ("device", "auto"), ("allow_pickle", False),
                             ("ignore_modules_to_save", False), ("verify_inputs", False)):
            if getattr(self, key) != default:
                doc[key] = getattr(self, key)
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)

    def options(self, **update: Any) -> MergeOptions:
        """The run options this recipe asks for (``update`` overrides, e.g. ``force=True``)."""
        out = self.output
        return MergeOptions(**{
            "out": Path(out.path) if out.path else None, "output_format": out.format, "dtype": out.dtype,
            "profile": out.profile, "base_gguf": Path(out.base_gguf) if out.base_gguf else None,
            "device": self.device, "seed": self.seed, "scale": self.scale, "missing": self.missing,
            "allow_pickle": self.allow_pickle, "ignore_modules_to_save": self.ignore_modules_to_save,
            "verify_inputs": self.verify_inputs, "push_to_hub": out.push_to_hub,
            "private": out.private, "revision": out.revision, "commit_message": out.commit_message, **update})


_MODELS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Recipe, ("adapters",): AdapterSpec, ("modules",): ModuleSpec, ("output",): OutputSpec,
}


def _pydantic_message(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _MODELS.get(tuple(p for p in loc[:-1] if isinstance(p, str)))
        allowed = ", ".join(model.model_fields) if model else ""
        return f"unknown key {loc[-1]!r}" + (f"; expected one of: {allowed}" if allowed else "")
    if kind == "missing":
        return "required key is missing"
    if kind == "too_short" and loc == ("adapters",):
        return "list at least one adapter (source and weight)"
    msg = err["msg"].removeprefix("Value error, ")
    if msg == _NOT_FINITE:
        return not_finite(format_loc(loc))
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)) or value is None:
        msg += f" (got {value!r})"
    return msg


def read_recipe_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise LoraMergeError(f"{p}: no such recipe file")
    return read_text_utf8(p)  # issue 14: non-UTF-8 bytes are one error


def validate_recipe(text: str, name: str = "recipe", *, force: bool = False,
                    check_token: bool = True) -> tuple[Recipe, dict[Loc, int]]:
    """Parse and validate a recipe without reading any adapter; raise one error listing every problem."""
    data, lines, dups = load_yaml_with_lines(text, name)
    problems = Problems(name, lines)
    for loc, line in dups:
        problems.lines[loc] = line
        problems.add(loc, "duplicate key; keep one")
    if not isinstance(data, dict):
        problems.add((), "a recipe is a mapping with method, adapters and output keys")
        problems.raise_if_any()
    recipe: Recipe | None = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            problems.add(tuple(err["loc"]), _pydantic_message(err))
    _check_semantics(data, problems, available(), force=force, check_token=check_token)
    if recipe is not None:
        _check_options(recipe, problems)
    problems.raise_if_any()
    assert recipe is not None
    return recipe, lines


# MergeOptions field -> where a recipe sets it (issue 28: ``seed: -1`` was a raw ValidationError at run time)
_OPTION_LOCS: dict[str, Loc] = {"out": ("output", "path"), "output_format": ("output", "format"),
                                "dtype": ("output", "dtype"), "profile": ("output", "profile"),
                                "base_gguf": ("output", "base_gguf"), "push_to_hub": ("output", "push_to_hub"),
                                "private": ("output", "private"), "revision": ("output", "revision"),
                                "commit_message": ("output", "commit_message")}


def _check_options(recipe: Recipe, problems: Problems) -> None:
    """The run options the recipe asks for pass MergeOptions' own checks (each at the recipe's line)."""
    try:
        recipe.options()
    except ValidationError as e:
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            loc = _OPTION_LOCS.get(field, (field,) if field else ())
            if not any(path == format_loc(loc) for _, path, _ in problems.items):
                problems.add(loc, _pydantic_message(err))


def _check_semantics(data: dict[str, Any], problems: Problems, algos: dict[str, Any], *, force: bool,
                     check_token: bool) -> None:
    """Checks beyond the schema, on the raw data so that they run even when other parts are broken."""
    adapters = data.get("adapters") if isinstance(data.get("adapters"), list) else None
    method = data.get("method")
    algo = None
    if isinstance(method, str):
        if method not in algos:
            problems.add(("method",), unknown_method(method, algos))
        else:
            algo = algos[method]  # its entry: name and Params, without importing the class (and torch)
    base_params = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    if algo is not None:
        check_parameters(algo, {}, base_params, ("parameters",), problems)
    for i, a in enumerate(adapters or []):
        src = a.get("source") if isinstance(a, dict) else None
        if isinstance(src, str) and (why := _too_long(src)):
            problems.add(("adapters", i, "source"), why)
        elif isinstance(src, str):
            try:
                missing = missing_source(src)  # FILE:alpha=N is a local file too
            except LoraMergeError as e:
                missing = e
            if missing is not None:
                problems.add(("adapters", i, "source"), str(missing))
    modules = data.get("modules") if isinstance(data.get("modules"), list) else []
    for i, m in enumerate(modules):
        if not isinstance(m, dict):
            continue
        loc: Loc = ("modules", i)
        match = m.get("match")
        if isinstance(match, str):
            if not match.strip() or match.strip() == "re:":
                problems.add(loc + ("match",), "empty pattern; use a glob like '*.mlp.*' or 're:<regex>'")
            elif match.startswith("re:"):
                try:
                    re.compile(match[3:])
                except re.error as e:
                    problems.add(loc + ("match",), f"invalid regular expression: {e}")
        if "parameters" not in m and "weights" not in m:
            problems.add(loc, "an override needs parameters or weights (or both)")
        if algo is not None and isinstance(m.get("parameters"), dict):
            check_parameters(algo, base_params, m["parameters"], loc + ("parameters",), problems)
        w = m.get("weights")
        if isinstance(w, list) and adapters is not None:
            try:
                weight_count(w, len(adapters))
            except LoraMergeError as e:
                problems.add(loc + ("weights",), e.template)
    out = data.get("output")
    if isinstance(out, dict):
        _check_output(out, problems, force=force, check_token=check_token)
    dev = data.get("device")
    if isinstance(dev, str):
        _option(problems, ("device",), check_device, dev)


def _too_long(path: str) -> str | None:
    """Why ``path`` cannot exist (a name over 255 bytes, issue 28), else None."""
    try:
        path_fits(path)
    except LoraMergeError as e:
        return str(e)
    return None


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _option(problems: Problems, loc: Loc, check: Any, value: str) -> None:
    """An option's one validator (:mod:`mergekit_lora.options`), its problem at the recipe's line."""
    try:
        check(value)
    except ValueError as e:
        problems.add(loc, str(e))


def _check_output(out: dict[str, Any], problems: Problems, *, force: bool, check_token: bool) -> None:
    path = out.get("path")
    if isinstance(path, str) and (why := _too_long(path)):
        problems.add(("output", "path"), why)
    elif isinstance(path, str) and path:
        try:
            check_output(Path(path), force)  # the pipeline's own check (plan stage 1), one wording
        except LoraMergeError as e:
            problems.add(("output", "path"), e.template)
    fmt = out.get("format")
    if isinstance(fmt, str):
        from ..formats.registry import (
            writable,  # the format modules import torch: only when a format is named
        )

        formats = writable()
    if isinstance(fmt, str) and fmt not in formats:
        problems.add(("output", "format"), f"unknown output format {fmt!r}; available: {', '.join(sorted(formats))}")
    dtype = out.get("dtype")
    if isinstance(dtype, str):
        _option(problems, ("output", "dtype"), check_dtype, dtype)
    repo = out.get("push_to_hub")
    if isinstance(repo, str):
        hub = parse_hub_id(repo)
        if hub is None or hub.subfolder or hub.revision:
            problems.add(("output", "push_to_hub"), f"{repo!r} is not a Hub repo id; use org/name")
        elif check_token and not env_token():
            problems.add(("output", "push_to_hub"),
                         "pushing needs a token: set HF_TOKEN (a write token) or run `hf auth login`")


# Parameters whose Python field name differs from the name users write (``lambda`` is a Python keyword).
_ALIASES = {"lambda_": "lambda"}


def recipe_yaml(sources: Sequence[str | Path], method: str, params: dict[str, Any] | None, weights: Sequence[float] | None,
                options: MergeOptions, base_model: str | None = None) -> str:
    """The recipe YAML of a merge request (``--emit-recipe``; running it gives the same output bytes)."""
    w = weights if weights is not None else [None] * len(sources)
    o = options
    return Recipe(
        method=method, base_model=base_model,
        adapters=[AdapterSpec(source=str(s), weight=None if wi is None else float(wi)) for s, wi in zip(sources, w)],
        parameters={_ALIASES.get(k, k): v for k, v in (params or {}).items() if v is not None},
        output=OutputSpec(path=str(o.out) if o.out is not None else "", format=o.output_format, dtype=o.dtype,
                          profile=o.profile, base_gguf=str(o.base_gguf) if o.base_gguf else None),
        seed=o.seed, scale=o.scale, missing=o.missing, device=o.device, allow_pickle=o.allow_pickle,
        ignore_modules_to_save=o.ignore_modules_to_save, verify_inputs=o.verify_inputs,
    ).to_yaml()
