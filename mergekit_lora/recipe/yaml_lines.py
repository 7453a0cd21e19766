"""Safe YAML with line numbers: every value's path -> the line it starts on, for error messages.

``yaml.safe_load`` drops positions; composing the node tree with the same safe loader keeps them, so
a validation error can say ``adapters[1].weight (line 7)``.  Duplicate keys (which PyYAML silently
resolves to the last one) are reported as problems.

Untrusted recipes cannot exhaust memory or the stack: aliases (``*name``, which expand every time
they are walked: the "billion laughs" bomb) are refused, nesting is capped at :data:`MAX_DEPTH`
levels, and bytes that are not UTF-8 are one error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import LoraMergeError

Loc = tuple[str | int, ...]
MAX_DEPTH = 64


_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~20x faster
# what PyYAML's safe constructors raise on a value that does not fit its explicit tag
# (``!!int x``: ValueError, ``!!bool x``: KeyError, ``!!timestamp x``: AttributeError, ...)
_CONSTRUCT_ERRORS = (ValueError, KeyError, AttributeError, TypeError, OverflowError, IndexError, UnicodeError)


def _tag(node: yaml.Node) -> str:
    return str(node.tag).replace("tag:yaml.org,2002:", "!!")


class _Constructing:
    """Mixin: a value that its tag's constructor cannot build is a ConstructorError at the value's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except yaml.YAMLError:
            raise
        except _CONSTRUCT_ERRORS:
            shown = node.value if isinstance(node, yaml.ScalarNode) else f"<{type(node).__name__[:-4].lower()}>"
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown!r} is not a valid {_tag(node)} value; remove the tag or fix the value",
                node.start_mark) from None


class _Loader(_Constructing, _BASE_LOADER):  # type: ignore[misc,valid-type]
    pass


class _PyLoader(_Constructing, yaml.SafeLoader):
    pass


_LOADER: type = _Loader if _BASE_LOADER is not yaml.SafeLoader else _PyLoader


class _Refused(yaml.composer.ComposerError):
    """Our own refusal (alias, depth), as opposed to a syntax error from the parser."""


def _refuse_aliases_and_depth(text: str, loader: type = _LOADER) -> None:
    """One pass over the parser's events (no tree is built): aliases and deep nesting are refused
    before anything expands or recurses."""
    depth = 0
    for ev in yaml.parse(text, Loader=loader):
        if isinstance(ev, yaml.AliasEvent):
            raise _Refused(None, None, f"aliases (*{ev.anchor}) are not allowed in a recipe; "
                                              "write the value out in full", ev.start_mark)
        if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", ev.start_mark)
        elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def read_text_utf8(path: str | Path, what: str = "recipe") -> str:
    """A text file's contents; bytes that are not UTF-8 are one :class:`LoraMergeError`."""
    p = Path(path)
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise LoraMergeError(f"{p}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                             "save it as UTF-8") from None


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
            key = knode.value if isinstance(knode, yaml.ScalarNode) else f"<{knode.tag}>"
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
    loader = None
    try:
        try:
            _refuse_aliases_and_depth(text)
        except yaml.YAMLError as e:
            if isinstance(e, _Refused) or _BASE_LOADER is yaml.SafeLoader:
                raise
            _refuse_aliases_and_depth(text, yaml.SafeLoader)  # PyYAML's own messages are clearer than libyaml's
            raise
        loader = _LOADER(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except RecursionError:
        raise LoraMergeError(f"{name}: not valid YAML: nested too deeply") from None
    except _CONSTRUCT_ERRORS as e:  # anything the per-node guard did not see (issue 28): still one line
        raise LoraMergeError(f"{name}: not valid YAML: {type(e).__name__}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LoraMergeError(f"{name}: not valid YAML{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
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
