"""Module-name helpers shared by readers, recipes, reports and routing (pure string functions).

>>> natural_key("layers.10.q") > natural_key("layers.2.q")
True
>>> module_group("model.layers.3.self_attn.q_proj")
'model.layers.*.self_attn.q_proj'
>>> layer_index("model.layers.3.mlp"), matches("*.mlp.*", "model.layers.3.mlp.up_proj")
(3, True)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def natural_key(name: str) -> list:
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def module_group(name: str) -> str:
    """Group key: the module path with layer indices replaced by ``*`` (``layers.*.self_attn.q_proj``)."""
    return re.sub(r"\.\d+\.", ".*.", name)


def layer_index(module: str) -> int | None:
    """The first numeric path component (``model.layers.3.mlp`` -> 3); None for non-layer modules."""
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def matches(pattern: str, module: str) -> bool:
    """Glob (fnmatch, case-sensitive) on the whole name, or ``re:<regex>`` searched anywhere in it."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], module) is not None
    return fnmatch.fnmatchcase(module, pattern)


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching ``(.*\\.)?(key)$``."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default
