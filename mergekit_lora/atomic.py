"""Atomic output folders: write into a temp folder beside the target, then rename into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraMergeError


def check_output(out: Path, force: bool) -> None:
    """Fail early (before any heavy work) if ``out`` exists and ``force`` is not set."""
    out = Path(out)
    if out.exists() and not force:
        raise LoraMergeError(f"{out} already exists; choose another output or pass «force» to replace it")
    if out.exists() and not out.is_dir():
        raise LoraMergeError(f"{out} exists and is not a folder")


@contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out``, on any error it is removed.

    A reader never sees a half-written output, and an existing output survives a failed run.
    """
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(trash / "old")
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
