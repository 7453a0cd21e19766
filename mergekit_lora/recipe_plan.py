"""Resolve a validated recipe against the inputs' headers, and run it.

Reading headers only (no tensor data): inputs are resolved (Hub ids downloaded or found in the
cache), the base model is checked, the pre-flight plan is built, and every module gets its
parameters and weights (first matching override wins; gradients are interpolated over the relative
layer index).  The resulting table is what ``--dry-run`` prints and what the driver's ``overrides``
hook returns, so the dry run shows exactly what the merge will do.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter import Adapter
from .errors import LoraMergeError
from .formats import load_adapter
from .preflight import MergePlan, check_compatible
from .recipe import Problems, Recipe, read_recipe_text, validate_recipe
from .recipe_params import at, evaluate, gradient_fields
from .registry import Algorithm, AlgorithmParams, get_algorithm
from .yaml_lines import Loc

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module: str) -> int | None:
    """The first numeric path component (``model.layers.3.mlp`` -> 3); None for non-layer modules."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def matches(pattern: str, module: str) -> bool:
    """Glob (fnmatch, case-sensitive) on the whole name, or ``re:<regex>`` searched anywhere in it."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], module) is not None
    return fnmatch.fnmatchcase(module, pattern)


@dataclass(frozen=True)
class ModuleRow:
    """One output module as the recipe resolves it."""

    name: str
    layer: int | None
    t: float
    params: AlgorithmParams
    weights: tuple[float, ...]
    override: int | None  # index into recipe.modules, None = defaults


@dataclass
class ResolvedRecipe:
    recipe: Recipe
    text: str
    name: str
    algorithm: Algorithm
    adapters: list[Adapter]
    plan: MergePlan
    rows: dict[str, ModuleRow]
    params: AlgorithmParams  # the top-level parameters at t = 0 (what the card lists)
    weights: list[float]
    matched: dict[int, int] = field(default_factory=dict)  # override index -> modules matched

    def overrides(self, module: str) -> tuple[AlgorithmParams, tuple[float, ...]]:
        row = self.rows[module]
        return row.params, row.weights


def resolve_recipe(text: str, name: str = "recipe", *, force: bool = False, check_token: bool = True,
                   lines: dict[Loc, int] | None = None, recipe: Recipe | None = None) -> ResolvedRecipe:
    """Validate (if not done), load the inputs' headers and build the per-module table."""
    if recipe is None or lines is None:
        recipe, lines = validate_recipe(text, name, force=force, check_token=check_token)
    problems = Problems(name, lines)
    adapters: list[Adapter] = []
    load_opts = {"allow_pickle": recipe.allow_pickle, "ignore_modules_to_save": recipe.ignore_modules_to_save}
    for i, spec in enumerate(recipe.adapters):
        try:
            a = load_adapter(spec.source, **load_opts)
        except LoraMergeError as e:
            problems.add(("adapters", i, "source"), str(e))
            continue
        a.label = spec.source
        adapters.append(a)
    problems.raise_if_any()
    if recipe.base_model:
        want = recipe.base_model.rstrip("/").lower()
        for i, a in enumerate(adapters):
            got = a.meta.base_model
            if got and got.rstrip("/").lower() != want:
                problems.add(("base_model",), f"the recipe says {recipe.base_model} but adapters[{i}] "
                             f"({recipe.adapters[i].source}) was trained on {got}; fix base_model or the input")
    problems.raise_if_any()
    plan = check_compatible(adapters, recipe.missing)
    algo = get_algorithm(recipe.method)
    rows, matched = _table(recipe, algo, plan, problems)
    problems.raise_if_any()
    top = gradient_fields(algo, recipe.parameters)
    params = algo.Params(**evaluate(top, 0.0))
    weights = [float(at(a.weight, 0.0)) for a in recipe.adapters]
    return ResolvedRecipe(recipe, text, name, algo, adapters, plan, rows, params, weights, matched)


def _table(recipe: Recipe, algo: Algorithm, plan: MergePlan,
           problems: Problems) -> tuple[dict[str, ModuleRow], dict[int, int]]:
    layers = [layer_index(m.name) for m in plan.modules]
    n_layers = max((x for x in layers if x is not None), default=0) + 1
    top = recipe.parameters
    cache: dict[tuple[Any, ...], AlgorithmParams] = {}
    rows: dict[str, ModuleRow] = {}
    matched = {i: 0 for i in range(len(recipe.modules))}
    for mp, layer in zip(plan.modules, layers):
        t = 0.0 if layer is None or n_layers < 2 else layer / (n_layers - 1)
        idx = next((i for i, o in enumerate(recipe.modules) if matches(o.match, mp.name)), None)
        values = dict(top)
        weights: list[Any] = [a.weight for a in recipe.adapters]
        if idx is not None:
            matched[idx] += 1
            values.update(recipe.modules[idx].parameters)
            if recipe.modules[idx].weights is not None:
                weights = list(recipe.modules[idx].weights)
        concrete = evaluate(gradient_fields(algo, values), t)
        key = tuple(sorted((k, repr(v)) for k, v in concrete.items()))
        if key not in cache:
            cache[key] = algo.Params(**concrete)
        rows[mp.name] = ModuleRow(mp.name, layer, t, cache[key], tuple(float(at(w, t)) for w in weights), idx)
    for i, count in matched.items():
        if count == 0:
            problems.add(("modules", i, "match"), f"{recipe.modules[i].match!r} matches no module of the inputs; "
                         "fix the pattern or remove the override (see `loramerge inspect --modules`)")
    return rows, matched


def load_recipe(path: str | Path, *, force: bool = False, check_token: bool = True) -> ResolvedRecipe:
    """Read, validate and resolve the recipe file at ``path`` (headers only)."""
    text = read_recipe_text(path)
    return resolve_recipe(text, str(path), force=force, check_token=check_token)


def run_recipe(resolved: ResolvedRecipe, *, force: bool = False, progress: bool = False) -> Any:
    """Merge as the recipe says (the driver writes recipe.yaml and the card), then push if asked."""
    from .merge import merge

    r = resolved.recipe
    result = merge(
        resolved.adapters, r.method, r.output.path, weights=resolved.weights, params=resolved.params,
        missing=r.missing, device=r.device, dtype=r.output.dtype, seed=r.seed, force=force,
        output_format=r.output.format, progress=progress, recipe=resolved.text, overrides=resolved.overrides,
    )
    if r.output.push_to_hub:
        from .hub import push_folder

        push_folder(r.output.path, r.output.push_to_hub, private=r.output.private, revision=r.output.revision,
                    commit_message=r.output.commit_message)
    return result
