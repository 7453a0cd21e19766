"""On-disk cache of task scores for fixed variants (the base model, committed adapters).

Every scenario of the suite scores the base model and the individual adapters on the same test
examples; those scores depend only on the model files, the tokenised examples and the batch layout,
so they are computed once and read back afterwards.  The key hashes the bytes of the base model's
weights and the adapter's files, the token ids and gold labels of every example, the batch size and
the device type; a changed file or example misses the cache.  Merged adapters are keyed the same way,
by their bytes (merges are deterministic for a seed).  A merge's fidelity summary (:func:`cached_fidelity`)
is cached the same way, keyed by the bytes of the merged adapter and of its inputs and by the weights.
A merge itself is remembered by :func:`merge_key` (the inputs' bytes, method, parameters, weights, scale,
seed, device type and the package version) → its output's digest, module count and fidelity
(:func:`lookup_merge`): when every score of that digest is cached too (:func:`cached_scores_of`), a
re-run does not merge at all.  A change to a method's code within one package version is not seen by
the key; clear the cache (or bump :data:`MERGE_VERSION`) after one.

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

from mergekit_lora import __version__

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
    return score_key_of(base, folder_digest(adapter) if adapter is not None else "base", task, batch_size, device)


def score_key_of(base: Path, adapter_digest: str, task: EncodedTask, batch_size: int, device: str) -> str:
    """:func:`score_key` from the adapter's :func:`folder_digest` (``"base"``: the base model alone)."""
    h = hashlib.sha256(f"scores-v{ENTRY_VERSION}".encode())
    h.update(folder_digest(base).encode())
    h.update(adapter_digest.encode())
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


# Bumped whenever a merge record's content or the merges' output changes within one package version.
MERGE_VERSION = 1


def merge_key(inputs: Sequence[Path], method: str, params: dict[str, Any], weights: Sequence[float],
              scale: str | float, seed: int, device: str) -> str:
    """Key of one merge: the inputs' bytes, the method and its parameters, weights, strength, seed, device
    type and the package version (merges are deterministic for these)."""
    h = hashlib.sha256(f"merge-v{MERGE_VERSION}-{__version__}".encode())
    for p in inputs:
        h.update(path_digest(p).encode())
    h.update(json.dumps([method, params, [float(w) for w in weights], str(scale), seed, device.split(":")[0]],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def lookup_merge(key: str) -> dict[str, Any] | None:
    """The record :func:`store_merge` kept for ``key`` ({"digest", "modules", "fidelity", "rank"}), or None."""
    hit = lookup(f"merge-{key}")
    return hit if hit is not None and {"digest", "modules", "fidelity", "rank"} <= set(hit) else None


def store_merge(key: str, merged: Path, modules: int, fidelity: dict[str, Any]) -> None:
    """Remember the merge ``key``: its output folder's digest, module count and fidelity summary
    (:func:`cached_fidelity`'s value: {"overall", "rank"})."""
    store(f"merge-{key}", {"digest": folder_digest(merged), "modules": modules, "fidelity": fidelity["overall"],
                           "rank": fidelity["rank"]})


def cached_scores_of(base: Path, digest: str, encoded: dict[str, EncodedTask], *, batch_size: int,
                     device: Any, **_: Any) -> dict[str, dict[str, Any]] | None:
    """Every task's cached scores of the adapter whose :func:`folder_digest` is ``digest``; None when any
    task misses (the adapter itself is not needed: nothing is scored here)."""
    got = {t: lookup(score_key_of(base, digest, e, batch_size, str(device))) for t, e in encoded.items()}
    return None if any(v is None for v in got.values()) else got  # type: ignore[return-value]
