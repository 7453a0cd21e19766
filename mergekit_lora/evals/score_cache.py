"""On-disk cache of task scores for fixed variants (the base model, committed adapters).

Every scenario of the suite scores the base model and the individual adapters on the same test
examples; those scores depend only on the model files, the tokenised examples and the batch layout,
so they are computed once and read back afterwards.  The key hashes the bytes of the base model's
weights and the adapter's files, the token ids and gold labels of every example, the batch size and
the device type; a changed file or example misses the cache.  Merged adapters are keyed the same way,
by their bytes (merges are deterministic for a seed), so re-running a scenario re-merges but only
scores what changed.  A merge's fidelity summary (:func:`cached_fidelity`) is cached the same way, keyed
by the bytes of the merged adapter and of its inputs and by the weights: a re-run with every score
cached computes no fidelity either.

Entries live under ``<cache_dir>/scores/<key>.json`` (see :func:`suite.model.cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from .tasks import EncodedTask, evaluate_variant


@cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of the folder's weight/config files (memoised per size+mtime)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin", ".gguf"):
            st = f.stat()
            h.update(f.name.encode())
            h.update(_file_digest(str(f), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def path_digest(path: Path) -> str:
    """:func:`folder_digest` of a folder; sha256 of a single file's name and bytes."""
    p = Path(path)
    if p.is_dir():
        return folder_digest(p)
    st = p.stat()
    return hashlib.sha256(f"{p.name}:{_file_digest(str(p), st.st_size, st.st_mtime_ns)}".encode()).hexdigest()


# Bumped whenever what an entry holds changes (2: per-example outcomes "correct"), so old entries miss.
ENTRY_VERSION = 2


def score_key(base: Path, adapter: Path | None, task: EncodedTask, batch_size: int, device: str) -> str:
    h = hashlib.sha256(f"scores-v{ENTRY_VERSION}".encode())
    h.update(folder_digest(base).encode())
    h.update((folder_digest(adapter) if adapter is not None else "base").encode())
    h.update(json.dumps([task.name, task.ids, task.gold.tolist(), task.label_tokens.tolist(), batch_size,
                         device.split(":")[0]]).encode())
    return h.hexdigest()


def cache_root() -> Path:
    from .suite.model import cache_dir

    return cache_dir() / "scores"


def lookup(key: str) -> dict[str, Any] | None:
    p = cache_root() / f"{key}.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def store(key: str, value: dict[str, Any]) -> None:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        tmp.replace(root / f"{key}.json")
    except OSError:
        pass  # an unwritable cache only costs time


def cached_scores(model, base: Path, adapter: Path | None, encoded: dict[str, EncodedTask], *,
                  enabled: bool = True, **ev: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({task: scores}, tasks read from the cache) for ``adapter`` on ``model`` (``None``: the base).

    ``ev`` is passed to :func:`tasks.evaluate_variant` (batch_size, device, pad_id); tasks missing
    from the cache are scored in one call and stored.
    """
    if not enabled:
        return evaluate_variant(model, adapter, encoded, **ev), []
    keys = {t: score_key(base, adapter, e, ev["batch_size"], str(ev["device"])) for t, e in encoded.items()}
    got = {t: lookup(k) for t, k in keys.items()}
    todo = {t: encoded[t] for t, v in got.items() if v is None}
    if todo:
        for t, v in evaluate_variant(model, adapter, todo, **ev).items():
            store(keys[t], v)
            got[t] = v
    return {t: got[t] for t in encoded}, sorted(set(encoded) - set(todo))


# Bumped whenever the fidelity summary or its computation changes, so old entries miss.
FIDELITY_VERSION = 1


def fidelity_key(merged: Path, inputs: Sequence[Path], weights: Sequence[float]) -> str:
    h = hashlib.sha256(f"fidelity-v{FIDELITY_VERSION}".encode())
    for p in (merged, *inputs):
        h.update(path_digest(p).encode())
    h.update(json.dumps([float(w) for w in weights]).encode())
    return h.hexdigest()


def cached_fidelity(merged: Path, inputs: Sequence[Path], weights: Sequence[float], *,
                    enabled: bool = True) -> tuple[dict[str, Any], bool]:
    """({"overall": fidelity_report(...).overall, "rank": the merge's largest module rank}, read from the
    cache?) for the merged adapter ``merged`` of ``inputs`` with ``weights``; computed and stored on a miss.

    JSON keeps every float exactly (shortest round-trip repr; ±inf as ``Infinity``), so a cached entry
    gives the same numbers as the computation."""
    key = fidelity_key(merged, inputs, weights) if enabled else None
    if key is not None and (hit := lookup(key)) is not None:
        return hit, True
    from .fidelity import fidelity_report  # torch: only on a miss

    fid = fidelity_report(merged, list(inputs), list(weights))
    value = {"overall": fid.overall, "rank": max((m.rank for m in fid.modules), default=0)}
    if key is not None:
        store(key, value)
    return value, False
