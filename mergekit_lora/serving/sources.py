"""Torch-free checks of what ``generate`` / ``serve`` are given: adapter names and folders (before any import of torch)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoraMergeError

BASE = "base"
AUTO = "auto"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def adapter_kind(path: str) -> tuple[str, Path]:
    """("peft" | "routed", local folder) for a folder or a Hub id; a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        from ..hub import resolve_hub

        got = resolve_hub(path)
        if got is None:
            raise LoraMergeError(f"{path}: no such adapter folder")
        p = got[0]
    if (p / "routing_config.json").is_file():
        return "routed", p
    if (p / "adapter_config.json").is_file():
        return "peft", p
    raise LoraMergeError(f"{path}: not a PEFT adapter folder (adapter_config.json) or a routed adapter "
                         "(routing_config.json); write a bare or kohya file as a PEFT folder with `loramerge merge`")


def parse_adapters(items: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` (or a bare PATH, named after its folder) -> {name: path}; names are unique."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        if not _NAME.match(name) or name in (BASE, AUTO):
            raise LoraMergeError(f"--adapter {item}: the name must be letters, digits, '.', '_' or '-' (not "
                                 f"{BASE!r} or {AUTO!r}); write NAME=PATH")
        if name in out:
            raise LoraMergeError(f"--adapter {item}: the name {name!r} is given twice; write NAME=PATH")
        out[name] = path
    return out
