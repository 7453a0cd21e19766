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
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from ..checks import check_output, weight_count
from ..errors import LoraMergeError, not_finite
from ..hub import env_token, parse_hub_id
from ..options import MergeOptions, make_options
from ..paths import path_fits
from ..registry import available, unknown_method
from ..request import MergeRequest, ModuleOverride
from ..sources import missing_source
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


class ModuleSpec(ModuleOverride):
    """A ``modules:`` entry: the request's :class:`ModuleOverride`, strict, its weights numbers or gradients."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    weights: list[Gradient] | None = None


# Where a recipe holds each run option (MergeOptions field -> YAML path), in the order ``to_yaml`` writes them.
# The fields are MergeOptions' own (default, description); MergeOptions validates them, once.  Fields not listed
# are choices of one run, not of the request: force (``run --force``), threads, progress.
OPTION_KEYS: dict[str, Loc] = {
    "out": ("output", "path"), "output_format": ("output", "format"), "dtype": ("output", "dtype"),
    "profile": ("output", "profile"), "base_gguf": ("output", "base_gguf"), "push_to_hub": ("output", "push_to_hub"),
    "private": ("output", "private"), "revision": ("output", "revision"),
    "commit_message": ("output", "commit_message"), "seed": ("seed",), "scale": ("scale",), "missing": ("missing",),
    "device": ("device",), "allow_pickle": ("allow_pickle",), "ignore_modules_to_save": ("ignore_modules_to_save",),
    "verify_inputs": ("verify_inputs",),
}


def _option_fields(group: tuple[str, ...]) -> dict[str, Any]:
    """The recipe fields of the options at ``group``: any value here (MergeOptions checks it), its default."""
    out: dict[str, Any] = {}
    for name, loc in OPTION_KEYS.items():
        if loc[:-1] == group and name != "out":
            info = MergeOptions.model_fields[name]
            out[loc[-1]] = (Any, Field(info.default, description=info.description))
    return out


OutputSpec = create_model("OutputSpec", __base__=_Strict, __doc__="A recipe's ``output:`` mapping.",
                          path=(str, Field(description=MergeOptions.model_fields["out"].description)),
                          **_option_fields(("output",)))


class _RecipeBase(_Strict):
    """A serialised merge request: the inputs, the method and its parameters, overrides and options."""

    method: str
    base_model: str | None = None
    adapters: list[AdapterSpec] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    modules: list[ModuleSpec] = Field(default_factory=list)
    output: OutputSpec  # type: ignore[valid-type]

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
        for name, loc in OPTION_KEYS.items():
            if len(loc) == 1 and (name == "seed" or getattr(self, name) != MergeOptions.model_fields[name].default):
                doc[name] = getattr(self, name)
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)

    def options(self, **update: Any) -> MergeOptions:
        """The run options this recipe asks for (``update`` overrides, e.g. ``force=True``), validated."""
        return make_options(**_option_values(self.model_dump()), **update)

    def request(self, text: str | None = None, **update: Any) -> MergeRequest:
        """The merge request this recipe is (``text``: the YAML, written beside the output)."""
        return MergeRequest(sources=[a.source for a in self.adapters], method=self.method, params=self.parameters,
                            weights=self.weights(), options=self.options(**update), overrides=tuple(self.modules),
                            base_model=self.base_model, recipe=text)


Recipe = create_model("Recipe", __base__=_RecipeBase, __doc__=_RecipeBase.__doc__, **_option_fields(()))


def _option_values(data: dict[str, Any]) -> dict[str, Any]:
    """MergeOptions fields from a recipe mapping (raw YAML or a dumped Recipe): only the keys it has."""
    values: dict[str, Any] = {}
    for name, loc in OPTION_KEYS.items():
        node: Any = data
        for key in loc:
            node = node.get(key, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            values[name] = (Path(node) if node else None) if name == "out" and isinstance(node, str) else node
    return values


_ABSENT = object()

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
    _check_options(data, problems)
    problems.raise_if_any()
    assert recipe is not None
    return recipe, lines


def _check_options(data: Any, problems: Problems) -> None:
    """The run options the recipe asks for, checked by MergeOptions itself (each problem at the recipe's line)."""
    if not isinstance(data, dict):
        return
    try:
        MergeOptions.model_validate(_option_values(data))
    except ValidationError as e:
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            loc = OPTION_KEYS.get(field, (field,) if field else ())
            if not any(path == format_loc(loc) for _, path, _ in problems.items):
                msg = _pydantic_message({**err, "loc": loc})
                if repr(err.get("input")) in err["msg"]:  # check_dtype, check_device name the value themselves
                    msg = err["msg"].removeprefix("Value error, ")
                problems.add(loc, msg)


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


def _too_long(path: str) -> str | None:
    """Why ``path`` cannot exist (a name over 255 bytes, issue 28), else None."""
    try:
        path_fits(path)
    except LoraMergeError as e:
        return str(e)
    return None


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


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
            get_writer,  # the format modules import torch: only when a format is named
        )

        try:
            get_writer(fmt)  # the pipeline's own check, one wording
        except LoraMergeError as e:
            problems.add(("output", "format"), e.template)
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


def recipe_yaml(request: MergeRequest) -> str:
    """The recipe YAML of a merge request (``--emit-recipe``; running it gives the same output bytes)."""
    w = request.weights if request.weights is not None else [None] * len(request.sources)
    params = request.params
    values = params.model_dump(by_alias=True) if isinstance(params, BaseModel) else dict(params or {})
    opts = request.options.model_dump(mode="json")
    doc: dict[str, Any] = {
        "method": request.method, "base_model": request.base_model,
        "adapters": [{"source": str(s), "weight": wi} for s, wi in zip(request.sources, w)],
        "parameters": {_ALIASES.get(k, k): v for k, v in values.items() if v is not None},
        "modules": [o.model_dump(exclude_defaults=True) for o in request.overrides], "output": {}}
    for name, loc in OPTION_KEYS.items():
        target = doc["output"] if loc[0] == "output" else doc
        target[loc[-1]] = opts[name] if opts[name] is not None or name != "out" else ""
    return Recipe.model_validate(doc, strict=False).to_yaml()
