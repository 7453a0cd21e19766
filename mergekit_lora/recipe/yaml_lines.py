"""Safe YAML with line numbers: every value's path -> the line it starts on, for error messages.

``yaml.safe_load`` drops positions; composing the node tree with the same safe loader keeps them, so
a validation error can say ``adapters[1].weight (line 7)``.  Duplicate keys (which PyYAML silently
resolves to the last one) are reported as problems.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import LoraMergeError

Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """``("adapters", 0, "weight")`` -> ``adapters[0].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], dups: list[tuple[Loc, int]]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for knode, vnode in node.value:
            key = knode.value
            if key in seen:
                dups.append((loc + (key,), knode.start_mark.line + 1))
            seen.add(key)
            lines[loc + (key,)] = knode.start_mark.line + 1
            _walk(vnode, loc + (key,), lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, loc + (i,), lines, dups)


def load_yaml_with_lines(text: str, name: str) -> tuple[Any, dict[Loc, int], list[tuple[Loc, int]]]:
    """Parse ``text`` safely; return (data, path -> line, duplicate keys as (path, line))."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LoraMergeError(f"{name}: not valid YAML{where}: {problem}") from None
    lines: dict[Loc, int] = {}
    dups: list[tuple[Loc, int]] = []
    if node is not None:
        _walk(node, (), lines, dups)
    return data, lines, dups


def line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of ``loc``, or of its nearest recorded parent (a missing key is reported at its parent)."""
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return 1
