"""``MergeOptions``: every run-level choice of a merge in one frozen object (no method parameters).

Built once — by the CLI (its shared flags are generated from these fields), by a recipe, or by a
Python caller — and passed down unchanged: ``plan(MergeRequest(sources, method, params, weights, options))``.
Importing this module imports no torch.

Example::

    opts = MergeOptions(out="merged", dtype="bfloat16", seed=0)
    make_options(opts, force=True)  # a changed copy, validated (model_copy(update=...) is not)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LoraMergeError, raise_all
from .strength import SCALE_HELP, normalize_scale

MissingPolicy = Literal["union", "intersection", "error"]
# Output dtype names users may write -> torch dtype attribute names.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_dtype(name: str) -> str:
    """The one validator of an output dtype name (ValueError); returns the torch attribute name."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(DTYPE_NAMES))}")
    return DTYPE_NAMES[name]


def check_device(name: str) -> str:
    """The one validator of a device name (ValueError): auto, cpu, cuda or cuda:N."""
    if not _DEVICE.match(name):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name


class MergeOptions(BaseModel):
    """Run-level options shared by every entry point (merge, cluster, route, run, eval compare, tune)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out: Path | None = Field(None, description="output folder (None: keep the merged modules in memory)")
    output_format: str | None = Field(None, description="output format (default: the inputs' family)")
    dtype: str | None = Field(None, description="output dtype (default: the inputs')")
    device: str = Field("auto", description="where to compute: auto|cpu|cuda")
    seed: int = Field(0, ge=0, description="seed for everything random")
    scale: str = Field("auto", description=SCALE_HELP)
    missing: MissingPolicy = Field("union", description="modules missing from some inputs: union|intersection|error")
    force: bool = Field(False, description="replace an existing output")
    allow_pickle: bool = Field(False, description="read .bin/.pt pickle files (only if you trust them)")
    ignore_modules_to_save: bool = Field(False, description="drop modules_to_save tensors instead of refusing")
    verify_inputs: bool = Field(False, description="fingerprint every input tensor's bytes when planning and check "
                                                   "them when read (an input rewritten in place is refused)")
    profile: Literal["default", "portable"] = Field(
        "default", description="PEFT output profile: portable = one rank, no rank/alpha patterns, lora_alpha = r "
                               "(what vLLM, SGLang and LoRAX load)")
    base_gguf: Path | None = Field(None, description="the base model's .gguf (needed by output format gguf)")
    threads: int | None = Field(None, ge=1, description="CPU threads for large dense work (default: all cores)")
    progress: bool = Field(False, description="show a progress bar")
    push_to_hub: str | None = Field(None, description="after writing, push the output to this Hub repo (org/name)")
    private: bool = Field(False, description="create the Hub repo private")
    revision: str | None = Field(None, description="Hub branch to push to")
    commit_message: str | None = Field(None, description="Hub commit message")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None:
            check_dtype(v)
        return v

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: object) -> str:
        return normalize_scale(v)

    @field_validator("missing", mode="before")
    @classmethod
    def _missing(cls, v: object) -> object:
        if v not in ("union", "intersection", "error"):
            raise ValueError("must be union, intersection or error")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)




def make_options(base: MergeOptions | None = None, **fields: Any) -> MergeOptions:
    """``base`` updated with ``fields``, validated; each invalid field is one problem naming it."""
    values = {**(base.model_dump() if base is not None else {}), **fields}
    try:
        return MergeOptions(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]) if err["loc"] else "options"
            if err["type"] == "extra_forbidden":
                raise LoraMergeError(f"unknown option {name!r}; options are: {', '.join(MergeOptions.model_fields)}",
                                     field=name) from None
            got = err.get("input")
            shown = f" (got {got!r})" if isinstance(got, (str, int, float)) else ""
            problems.append(LoraMergeError(f"«{name}»: {err['msg'].removeprefix('Value error, ')}{shown}", field=name))
        raise_all(problems)
        raise
