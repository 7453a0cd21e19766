"""Torch-free helpers about what a user names as an input: "did you mean" for a missing path, and the
``FILE.safetensors:alpha=16`` suffix that states the alpha of a bare PEFT file (no adapter_config.json).

Example::

    split_alpha("a.safetensors:alpha=16")  # -> ("a.safetensors", 16.0)
    did_you_mean(Path("examples/suite/topc"))  # -> " (did you mean examples/suite/topic?)"
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import LoraMergeError
from .paths import path_fits

_ALPHA = re.compile(r"^(?P<path>.+):alpha=(?P<alpha>[^:/]*)$")


def did_you_mean(path: Path) -> str:
    """`` (did you mean X?)`` naming the closest existing entry of the deepest existing parent, or ''."""
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return ""
    rest = path.relative_to(parent) if path.is_relative_to(parent) else None
    if rest is None or not rest.parts:
        return ""
    try:
        names = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(rest.parts[0], names, n=1, cutoff=0.6)
    if not close:
        return ""
    guess = parent / close[0] / Path(*rest.parts[1:]) if len(rest.parts) > 1 else parent / close[0]
    shown = str(guess) if str(path).startswith(("/", "./")) or parent != Path(".") else close[0]
    return f" (did you mean {shown}?)"


def missing_source(source: str | Path) -> LoraMergeError | None:
    """The error for a source that is neither an existing path nor a Hub id (torch-free, before any read)."""
    from .hub import parse_hub_id

    path, _ = split_alpha(source) if isinstance(source, str) else (source, None)
    path_fits(path)  # a name over 255 bytes: one sentence, not an OSError from the stat (issue 28)
    if Path(path).exists():
        return None
    hint = did_you_mean(Path(path))
    if parse_hub_id(str(path)) is not None and not (hint and Path(Path(path).parts[0]).is_dir()):
        return None  # a Hub id (a local near-miss under an existing folder is a typo, not a repo)
    return LoraMergeError(f"{path}: no such file or folder{hint}")


def source_problems(sources: Sequence[str | Path]) -> list[LoraMergeError]:
    """Every :func:`missing_source` problem of ``sources`` (and bad ``:alpha=`` suffixes)."""
    problems = []
    for s in sources:
        try:
            e = missing_source(s)
        except LoraMergeError as bad:
            e = bad
        if e is not None:
            problems.append(e)
    return problems


def check_sources(sources: Sequence[str | Path]) -> None:
    """Raise every :func:`missing_source` problem of ``sources`` at once."""
    from .errors import raise_all

    raise_all(source_problems(sources))


def split_alpha(source: str) -> tuple[str, float | None]:
    """``FILE:alpha=N`` -> (FILE, N); anything else -> (source, None).  N must be a positive number."""
    m = _ALPHA.match(source)
    if m is None:
        return source, None
    try:
        alpha = float(m["alpha"])
    except ValueError:
        alpha = math.nan
    if not (math.isfinite(alpha) and alpha > 0):
        raise LoraMergeError(f"{source}: alpha must be a positive number, like {m['path']}:alpha=16", field="adapters")
    return m["path"], alpha


def assumed_alpha(labels: Sequence[str], adapters: Sequence[Any]) -> str | None:
    """One sentence naming the inputs whose alpha was assumed = r (bare PEFT files without a config), or None."""
    names = [lab for lab, a in zip(labels, adapters)
             if a.meta.format == "peft" and a.meta.extra.get("alpha_assumed")]
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{shown}: no adapter_config.json, so alpha is assumed = r (scale 1) and the base model is not "
            f"checked; if an input was trained with another alpha, state it: {names[0].split(':alpha=')[0]}:alpha=16")


def refuse_gguf(path: Path) -> None:
    """A ``.gguf`` (llama.cpp model or LoRA) named as an input: say what it is, not "header too large"."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return
    if magic == b"GGUF":
        raise LoraMergeError(f"{path} is a GGUF file (a llama.cpp model or LoRA adapter); loramerge reads PEFT, kohya "
                             "and diffusers adapters (.safetensors folders or files) — GGUF is what `loramerge export` "
                             "writes for llama.cpp / Ollama")


__all__ = ["assumed_alpha", "check_sources", "did_you_mean", "missing_source", "source_problems", "refuse_gguf", "split_alpha"]
