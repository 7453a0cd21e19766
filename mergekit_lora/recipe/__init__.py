"""Recipes: a merge request written as YAML (schema, problems with their lines, layer gradients).

``Recipe.from_yaml`` validates everything that needs no adapter header; the pipeline's
:func:`mergekit_lora.pipeline.plan_recipe` turns a recipe into a plan.
"""

from .problems import Problems
from .schema import Recipe, read_recipe_text, recipe_yaml, validate_recipe

__all__ = ["Problems", "Recipe", "read_recipe_text", "recipe_yaml", "validate_recipe"]
