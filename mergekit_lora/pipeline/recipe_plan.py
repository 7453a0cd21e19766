"""A recipe through the pipeline: validate the YAML, then ``plan`` it, every problem at its YAML line.

The recipe is a serialised request: ``Recipe.request`` gives the :class:`~mergekit_lora.request.MergeRequest`
(adapters, method, parameters with layer gradients, per-module overrides, options) that
:func:`~mergekit_lora.pipeline.plan` takes whole, so a recipe
and the equivalent ``loramerge merge`` call produce the same plan — and the same bytes.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LoraMergeError, PlanErrors
from ..recipe import Problems, Recipe, read_recipe_text, validate_recipe
from ..recipe.schema import OPTION_KEYS
from ..recipe.yaml_lines import Loc
from .plan import MergePlan, plan

# Plan fields -> where they live in a recipe (the run options: where the recipe schema puts them).
_RECIPE_LOC: dict[str, Loc] = {**OPTION_KEYS, "params": ("parameters",), "weights": ("adapters",)}
_PART = re.compile(r"([A-Za-z_]+)|\[(\d+)\]")


def _loc(field: str | None) -> Loc:
    if not field:
        return ()
    if field in _RECIPE_LOC:
        return _RECIPE_LOC[field]
    return tuple(int(i) if i else name for name, i in _PART.findall(field))


def plan_recipe(path_or_text: str | Path, name: str | None = None, *, force: bool = False,
                check_token: bool = True) -> tuple[Recipe, MergePlan]:
    """Validate and plan a recipe (a file path, or YAML text with ``name``); headers only."""
    if name is None:
        name, text = str(path_or_text), read_recipe_text(path_or_text)
    else:
        text = str(path_or_text)
    recipe, lines = validate_recipe(text, name, force=force, check_token=check_token)
    try:
        p = plan(recipe.request(text, force=force))
    except LoraMergeError as e:
        problems = Problems(name, lines)
        for err in (e.problems if isinstance(e, PlanErrors) else [e]):
            problems.add(_loc(err.field), err.render())
        problems.raise_if_any()
        raise
    return recipe, p
