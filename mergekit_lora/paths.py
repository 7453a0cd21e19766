"""Path names that cannot exist: one sentence instead of ``OSError: File name too long`` (issue 28).

Torch-free (``loramerge inspect`` imports it on its fast path).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LoraMergeError

NAME_MAX, PATH_MAX = 255, 4096  # Linux/macOS limits, in bytes


def path_fits(path: str | Path, what: str = "") -> None:
    """Refuse a path with a component over the filesystem's name limit (255 bytes) or over PATH_MAX in
    all: one sentence instead of ``OSError: File name too long`` from the first stat (issue 28)."""
    raw = os.fsencode(str(path))
    label = f"{what} " if what else ""
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            shown = os.fsdecode(part[:24])
            raise LoraMergeError(f"{label}{str(path)[:60]}…: the path component {shown}… is {len(part)} bytes, "
                                 f"over the {NAME_MAX} a file or folder name may have; use a shorter name")
    if len(raw) >= PATH_MAX:
        raise LoraMergeError(f"{label}{str(path)[:60]}…: the path is {len(raw)} bytes, over the {PATH_MAX - 1} "
                             "a path may have; use a shorter path")


def exists(path: str | Path) -> bool:
    """``Path.exists`` that is False (not an OSError) for a name too long to exist."""
    try:
        return Path(path).exists()
    except OSError:
        return False


__all__ = ["NAME_MAX", "PATH_MAX", "exists", "path_fits"]
