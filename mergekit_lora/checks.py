"""Plan-time and write-time safety checks: small pure functions that raise one clear LoraMergeError.

The merge pipeline calls them in its single validation pass (before any tensor is read) and, for
:func:`check_finite` and :func:`check_unchanged`, while it reads and writes:

- :func:`finite_numbers`: weights and parameters (nested lists: layer gradients) hold no NaN/Inf;
- :func:`output_not_input`: the output is not an input, inside one, or a folder holding one;
- :func:`output_path_ok`: the output's parent can hold a new folder (exists or can be made, is a
  folder, writable; the name fits the filesystem);
- :func:`fingerprint` / :func:`check_unchanged`: each input file's size and mtime at plan time, and
  a refusal when a file changed before it was read;
- :func:`check_finite`: every output tensor is finite before the output is renamed into place.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import FLOAT_MAX, dtype_name
from .atomic import check_output  # noqa: F401  (the output-exists check, here with the request's others)
from .errors import LoraMergeError, not_finite
from .paths import exists


def _non_finite(value: Any, where: str) -> str | None:
    """The path (``[1]``, ``.density``) of the first NaN/Inf inside ``value``, else None."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else where
    torch = sys.modules.get("torch")  # a tensor can only be here if torch is already imported
    if torch is not None and isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return where
        return None
    if isinstance(value, Mapping):
        for k, v in value.items():
            hit = _non_finite(v, f"{where}.{k}" if where else str(k))
            if hit is not None:
                return hit
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            hit = _non_finite(v, f"{where}[{i}]")
            if hit is not None:
                return hit
    return None


def finite_numbers(name: str, values: Any) -> None:
    """Refuse NaN/Inf anywhere in ``values`` (a number, list, nested lists, a mapping or a pydantic model).

    ``name`` is the field as the user wrote it (``weights``, ``parameters``); the message names the
    entry: ``weights[0] is nan``.
    """
    data = values.model_dump() if hasattr(values, "model_dump") else values
    hit = _non_finite(data, name)
    if hit is not None:
        raise LoraMergeError(not_finite(hit), field=name.split("[")[0].split(" ")[0])


def weight_count(weights: Any, adapters: int, field: str = "weights") -> None:
    """The one validator of "one weight per adapter" (``weights`` None: the default, always right)."""
    if weights is not None and len(weights) != adapters:
        n = len(weights)
        raise LoraMergeError(f"got {n} weight{'' if n == 1 else 's'} for {adapters} adapter{'' if adapters == 1 else 's'}; "
                             "give one weight per adapter", field=field)


def _resolved(p: str | Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def output_not_input(out: str | Path, input_paths: Iterable[str | Path]) -> None:
    """Refuse an output that is an input, lies inside an input folder, or contains an input
    (the current folder or any parent of an input), after resolving symlinks; also ``''`` and ``.``.

    Hub ids and other sources that are not local paths are skipped (only existing paths count).
    """
    raw = str(out)
    if raw.strip() in ("", ".", "./") or raw.strip().rstrip("/") in ("", "."):
        raise LoraMergeError(f"output path {raw!r} is the current folder; name a new folder for the merged adapter", field="out")
    o = _resolved(out)
    if o == _resolved(Path.cwd()) or o == Path(o.anchor):
        raise LoraMergeError(f"output path {raw!r} is the current folder or a filesystem root; "
                             "name a new folder for the merged adapter", field="out")
    for src in input_paths:
        s = Path(str(src))
        if not exists(s):
            continue
        si = _resolved(s)
        if _inside(o, si):
            what = "is" if o == si else "is inside"
            raise LoraMergeError(f"output path {raw!r} {what} the input {src}; writing there would replace the "
                                 "input, choose another output", field="out")
        if _inside(si, o):
            raise LoraMergeError(f"output path {raw!r} contains the input {src}; replacing it would delete the "
                                 "input, choose another output", field="out")


def input_locations(weights_file: str | Path) -> list[Path]:
    """The paths an adapter read from ``weights_file`` occupies: the file, and its folder when the file is
    a PEFT ``adapter_model.*`` (the folder is the adapter the user named)."""
    f = Path(weights_file)
    return [f.parent, f] if f.name.startswith("adapter_model.") else [f]


def output_path_ok(out: str | Path) -> None:
    """Refuse an output folder that cannot be created: a parent that is a file, a read-only parent,
    a name longer than the filesystem allows."""
    o = Path(os.path.abspath(Path(out).expanduser()))
    try:
        limit = os.pathconf(_nearest_existing(o), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    # the temp folder beside the output is ``.NAME.tmp-PID-`` + 8 random characters (PID: up to 7 digits)
    for part in o.parts[1:]:
        if len(part.encode()) > limit:
            raise LoraMergeError(f"output path {str(out)!r}: the name {part[:20]}… is {len(part.encode())} bytes, "
                                 f"longer than the {limit} this filesystem allows; choose a shorter name", field="out")
    if len(o.name.encode()) + 24 > limit:
        raise LoraMergeError(f"output path {str(out)!r}: the name is {len(o.name.encode())} bytes, too long for "
                             f"its temp folder on this filesystem (at most {limit - 24}); choose a shorter name",
                              field="out")
    existing = _nearest_existing(o.parent)
    if not existing.is_dir():
        raise LoraMergeError(f"output path {str(out)!r}: {existing} is a file, not a folder; choose another output", field="out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LoraMergeError(f"output path {str(out)!r}: the folder {existing} is not writable; "
                             "choose an output in a folder you can write to", field="out")


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@dataclass(frozen=True)
class Fingerprint:
    """What a file looked like at plan time: its size and modification time (ns)."""

    path: str
    size: int
    mtime_ns: int


def fingerprint(paths: Iterable[str | Path]) -> dict[str, Fingerprint]:
    """Size + mtime of every existing regular file under ``paths`` (a folder: the files directly in it)."""
    out: dict[str, Fingerprint] = {}
    for p in paths:
        p = Path(str(p))
        files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            st = f.stat()
            out[str(f)] = Fingerprint(str(f), st.st_size, st.st_mtime_ns)
    return out


def check_unchanged(fingerprints: Mapping[str, Fingerprint], path: str | Path | None = None) -> None:
    """Refuse when a file recorded by :func:`fingerprint` changed (size or mtime) or disappeared.

    ``path``: check only that file (when it is about to be read); default: all of them.
    """
    items = [fingerprints[str(path)]] if path is not None and str(path) in fingerprints else (
        [] if path is not None else list(fingerprints.values()))
    for fp in items:
        try:
            st = os.stat(fp.path)
        except OSError:
            raise LoraMergeError(f"{fp.path}: the input disappeared during the merge; run again when it is "
                                 "no longer being written") from None
        if st.st_size != fp.size or st.st_mtime_ns != fp.mtime_ns:
            raise LoraMergeError(f"{fp.path}: the input changed during the merge (size or modification time); "
                                 "run again when it is no longer being written")


def check_finite(name: str, tensor: Any) -> None:
    """Refuse a NaN/Inf entry in output tensor ``name`` (the merge produced a non-finite value); torch or numpy."""
    if isinstance(tensor, np.ndarray):
        bad, total = int((~np.isfinite(tensor)).sum()), int(tensor.size)
    else:
        import torch  # lazily: the request checks above run before torch is imported

        if not tensor.is_floating_point():
            return
        bad, total = int((~torch.isfinite(tensor)).sum()), tensor.numel()
    if bad:
        raise LoraMergeError(f"the merged tensor {name} has {bad} NaN or Inf entries of {total}; "
                             "nothing was written, check the weights and parameters (or use float32 output)")


def finite_units(stream: Iterable[tuple[str, Any]], dtype: Any = None) -> Iterable[tuple[str, Any]]:
    """Pass ``(module, units)`` through, refusing non-finite factors (and values that overflow ``dtype``,
    e.g. float16's 65504) before the writer sees them; anything that is not rank units passes as is.
    Factors are torch tensors or numpy arrays (``ArrayUnits``); ``dtype`` a name or a torch dtype.

    One min/max reduction per factor (NaN propagates through it, ±Inf is its own extreme); only a
    failing factor pays for the detailed count."""
    name_ = dtype_name(dtype) if dtype is not None else None
    limit = FLOAT_MAX.get(name_) if name_ is not None else None
    shown = f"torch.{name_}" if name_ is not None else None  # the wording users have seen
    for name, u in stream:
        inner = getattr(u, "units", u)  # a routed module's pooled units (issue 28: route + --weights 1e30)
        for half, t in (("A", getattr(inner, "A", None)), ("B", getattr(inner, "B", None))):
            extremes = _extremes(t)
            if extremes is None:
                continue
            lo, hi = extremes
            if math.isfinite(lo) and math.isfinite(hi) and (limit is None or max(-lo, hi) <= limit):
                continue
            check_finite(f"{name} ({half})", t)
            if limit is not None and max(-lo, hi) > limit:
                raise LoraMergeError(f"the merged tensor {name} ({half}) has entries beyond the {shown} range "
                                     f"(±{limit:g}); nothing was written, write float32 or bfloat16 instead")
        yield name, u


def _extremes(t: Any) -> tuple[float, float] | None:
    """(min, max) of a non-empty floating-point factor (torch or numpy), else None."""
    if isinstance(t, np.ndarray):
        if t.dtype.kind != "f" or not t.size:
            return None
        with np.errstate(invalid="ignore"):
            return float(t.min()), float(t.max())
    torch = sys.modules.get("torch")  # a tensor can only be here if torch is already imported
    if torch is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
        return None
    lo, hi = torch.aminmax(t)
    return float(lo), float(hi)
