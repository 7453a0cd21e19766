"""``MergeRequest``: one merge request, whole — the one object :func:`mergekit_lora.pipeline.plan` takes.

Every entry point builds one and hands it over: the CLI (``merge``, ``cluster``, ``route``), a recipe
(``Recipe.request``), ``tune`` (one per trial), ``eval compare`` (through ``merge()``), routing and the
adapter library.  The model holds the request and checks only its shape; what the values mean (a known
method, parameters within their bounds, finite numbers, one weight per adapter, a free output) is
checked once, by ``plan()`` and the validators it calls.  Importing this module imports no torch.

Example::

    req = MergeRequest(sources=["a", "b"], method="svd", params={"rank": 8}, weights=[0.5, 0.5],
                       options=MergeOptions(out="merged"))
    plan(req.with_options(force=True))
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .options import MergeOptions, make_options
from .registry import AlgorithmParams


class ModuleOverride(BaseModel):
    """Per-module values (a recipe's ``modules:`` entry): the first override whose pattern matches wins."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str = Field(description="module names: a glob (*.mlp.*) or re:REGEX")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters for these modules")
    weights: list[Any] | None = Field(None, description="one weight (or layer gradient) per adapter for these modules")


class MergeRequest(BaseModel):
    """What to merge, how, and the run options: ``plan(request)`` checks it and decides the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    sources: list[Any] = Field(description="the inputs: local paths, Hub ids (str/Path) or loaded Adapters")
    method: str = Field(description="the merge method (see `loramerge methods`)")
    params: dict[str, Any] | AlgorithmParams | None = Field(
        None, description="the method's parameters (a mapping may hold layer gradients: lists)")
    weights: list[Any] | None = Field(None, description="one weight (or layer gradient) per source; None: 1/n each")
    options: MergeOptions = Field(default_factory=MergeOptions, description="the run options")
    overrides: tuple[ModuleOverride, ...] = Field((), description="per-module parameters/weights, first match wins")
    base_model: str | None = Field(None, description="the base model the inputs must record (a recipe's base_model)")
    recipe: str | None = Field(None, description="the request as recipe YAML, written beside the output")

    def replace(self, **fields: Any) -> MergeRequest:
        """A changed copy, validated like a new request."""
        return type(self).model_validate({**{k: getattr(self, k) for k in type(self).model_fields}, **fields})

    def with_options(self, **fields: Any) -> MergeRequest:
        """The same request with changed run options (validated by :func:`make_options`)."""
        return self.replace(options=make_options(self.options, **fields))
