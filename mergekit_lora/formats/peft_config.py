"""The keys of ``adapter_config.json`` this reader uses, validated with one sentence naming the key.

Only the keys the reader interprets are checked (unknown keys pass: PEFT adds new ones); a wrong
type (``r: "eight"``), a non-positive rank, a non-finite alpha or an invalid pattern regex is refused
before any tensor is read.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from ..errors import LoraMergeError


def _positive(v: int) -> int:
    if v <= 0:
        raise ValueError("must be a positive integer")
    return v


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def _regex_keys(v: dict[str, Any]) -> dict[str, Any]:
    for k in v:
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise ValueError(f"has a key {k!r} that is not a valid regular expression ({e})") from None
    return v


Rank = Annotated[StrictInt, AfterValidator(_positive)]
Alpha = Annotated[StrictInt | StrictFloat, AfterValidator(_finite)]
Names = list[StrictStr] | StrictStr


class PeftConfig(BaseModel):
    """The interpreted subset of a PEFT LoraConfig."""

    model_config = ConfigDict(extra="allow")

    peft_type: StrictStr | None = None
    r: Rank | None = None
    lora_alpha: Alpha | None = None
    rank_pattern: Annotated[dict[str, Rank], AfterValidator(_regex_keys)] | None = None
    alpha_pattern: Annotated[dict[str, Alpha], AfterValidator(_regex_keys)] | None = None
    base_model_name_or_path: StrictStr | None = None
    revision: StrictStr | None = None
    task_type: StrictStr | None = None
    target_modules: Names | None = None
    modules_to_save: Names | None = None
    fan_in_fan_out: StrictBool | None = None
    use_rslora: StrictBool | None = None
    use_dora: StrictBool | None = None
    lora_bias: StrictBool | None = None
    bias: StrictStr | None = None


_HELP = {
    "r": "must be a positive integer", "lora_alpha": "must be a finite number",
    "rank_pattern": "must map module regexes to positive integer ranks",
    "alpha_pattern": "must map module regexes to finite numbers",
    "target_modules": "must be a list of module names or one regex string",
    "modules_to_save": "must be a list of module names or one string",
}


def validate_config(cfg: dict[str, Any], path: Path | str) -> None:
    """Raise one :class:`LoraMergeError` naming the first bad key of ``cfg`` (``adapter_config.json``)."""
    try:
        PeftConfig.model_validate(cfg)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0])
        field = PeftConfig.model_fields[key]
        msg = err["msg"].removeprefix("Value error, ")
        if "regular expression" not in msg:
            kind = "true or false" if "bool" in str(field.annotation) else "a string"
            msg = _HELP.get(key, f"must be {kind}")
        got = cfg.get(key)
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        raise LoraMergeError(f"{path}: key {key!r} {msg} (got {shown}); fix adapter_config.json") from None
