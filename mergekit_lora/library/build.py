"""``index_sources``: find adapters under SOURCES, describe each (catalogue row + signature), update a library.

Incremental: an adapter whose files have the same names, sizes and mtimes as when it was indexed is kept
as it is (``rehash=True`` hashes it anyway); one whose content hash changed is re-indexed; a catalogue row
whose source no longer exists is removed.  All changes go into the catalogue in one transaction, then the
faiss file is rewritten from the catalogue (atomically).
"""

from __future__ import annotations

import glob
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import LoraMergeError
from ..evals.suite.model import resolve_base
from ..formats.peft_layout import is_peft_folder
from ..hub import download, parse_hub_id
from ..sources import did_you_mean
from .profile import MAX_LENGTH, VAR_FLOOR, compute_moments, file_hash, profile_vector
from .signature import signature
from .store import CATALOGUE, Library

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_GLOB = set("*?[")


@dataclass
class IndexReport:
    library: Path
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one sentence each
    profiled: list[str] = field(default_factory=list)  # sources whose domain profile was (re)computed
    profile_seconds: float = 0.0
    total: int = 0
    seconds: float = 0.0


def expand(sources: Sequence[str], hub_revisions: dict[Path, str] | None = None
           ) -> tuple[list[tuple[Path, bool]], list[str]]:
    """(adapter paths, each with "given explicitly"), skipped sources as sentences.  Missing paths are errors.

    A Hub id (``org/name[/sub][@rev]``) is downloaded into (or found in) the Hugging Face cache; its snapshot
    folder is the adapter's path and ``hub_revisions`` gets ``path -> "org/name[/sub]@<commit>"``."""
    found: list[tuple[Path, bool]] = []
    skipped: list[str] = []
    for s in sources:
        if _GLOB & set(s):
            matches = sorted(glob.glob(s))
            if not matches:
                raise LoraMergeError(f"{s}: the pattern matches nothing")
            for m in matches:
                found += [(p, False) for p in _walk(Path(m))]
        elif Path(s).exists():
            p = Path(s)
            found += [(q, q == p) for q in _walk(p)]
        elif (hub := parse_hub_id(s)) is not None:
            local, extra = download(hub)
            found.append((local, True))
            if hub_revisions is not None:
                name = hub.repo_id + (f"/{hub.subfolder}" if hub.subfolder else "")
                hub_revisions[local.resolve()] = f"{name}@{extra['resolved_revision']}"
        else:
            raise LoraMergeError(f"{s}: no such file or folder{did_you_mean(Path(s))}")
    seen: set[Path] = set()
    unique = []
    for p, explicit in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((key, explicit))
    return unique, skipped


def _walk(p: Path) -> list[Path]:
    """A PEFT folder or a .safetensors file is one adapter; any other folder is searched (hidden names skipped)."""
    if is_peft_folder(p) or (p.is_file() and p.suffix == ".safetensors"):
        return [p]
    if p.is_dir():
        return [q for child in sorted(p.iterdir()) if not child.name.startswith(".") for q in _walk(child)]
    return []


def adapter_files(p: Path) -> list[Path]:
    """The files whose bytes define the adapter: its weight file(s) and adapter_config.json."""
    if p.is_file():
        return [p]
    return sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES
                                                             or f.name == "adapter_config.json"))


def file_stat(files: Sequence[Path]) -> list[list[Any]]:
    return [[f.name, (st := f.stat()).st_size, st.st_mtime_ns] for f in files]


def content_hash(files: Sequence[Path]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def card_summary(p: Path) -> str | None:
    """The first Markdown heading of the adapter's README.md (else its first line), YAML front matter skipped."""
    readme = (p if p.is_dir() else p.parent) / "README.md"
    if not p.is_dir() or not readme.is_file():
        return None
    lines = [ln.strip() for ln in readme.read_text(errors="replace").splitlines()]
    if lines and lines[0] == "---":
        end = next((i for i, ln in enumerate(lines[1:], 1) if ln == "---"), 0)
        lines = lines[end + 1:]
    lines = [ln for ln in lines if ln]
    heading = next((ln.lstrip("#").strip() for ln in lines if ln.startswith("#")), None)
    text = heading or (lines[0] if lines else None)
    return text[:200] if text else None


def describe(p: Path, files: Sequence[Path], digest: str, stat: list[list[Any]],
             revision: str | None = None) -> dict[str, Any]:
    """One catalogue row (signature included) for the adapter at ``p``; ``revision``: its Hub id at the
    resolved commit when it came from the Hub."""
    from ..formats import load_adapter

    adapter = load_adapter(p)
    vec, norm = signature(adapter)
    return {
        "source": str(p), "revision": revision or adapter.meta.revision, "format": adapter.meta.format,
        "base_model": adapter.meta.base_model,
        "ranks": sorted({i.rank for i in adapter.modules.values()}),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapter.modules}),
        "modules": len(adapter.modules), "size_bytes": sum(s[1] for s in stat), "content_hash": digest,
        "stat": stat, "card": card_summary(p), "norm": norm, "signature": vec,
        "indexed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def index_sources(sources: Sequence[str], library: str | Path, *, rehash: bool = False,
                  examples: Mapping[str, str | Path] | None = None, base: str | Path | None = None,
                  ray_workers: int | None = None, ray_address: str | None = None,
                  say: Callable[[str], None] | None = None) -> IndexReport:
    """Index the adapters found under ``sources`` into the library folder ``library`` (created if needed).

    ``examples``: adapter source -> JSONL file of unlabeled examples of its domain; each gets a domain profile
    (``library/profile.py``) computed on the base model ``base`` (a transformers folder or ``smollm2-135m``;
    default: the one the library's profiles were made with), locally or on ``ray_workers`` Ray actors.  A
    profile is recomputed only when its examples file changed."""
    t0 = time.perf_counter()
    if not sources:
        raise LoraMergeError("give at least one SOURCE (a folder, an adapter, a file or a glob)")
    hub_revisions: dict[Path, str] = {}
    found, skipped = expand(sources, hub_revisions)
    if ray_workers is not None and ray_workers < 1:
        raise LoraMergeError(f"--ray-workers must be at least 1 (got {ray_workers})", field="ray_workers")
    new = not (Path(library) / CATALOGUE).is_file()
    if new:
        Library.check_new(Path(library))  # before the work; the folder is made only when there is a catalogue
    lib = None if new else Library.open(library)
    try:
        report = IndexReport(Path(library), skipped=skipped)
        known = lib.by_source() if lib is not None else {}
        jobs, base_path = _profile_jobs(examples or {}, found, known, lib, base)
        upserts = []
        for p, explicit in found:
            files = adapter_files(p)
            stat = file_stat(files)
            old = known.get(str(p))
            if old is not None and not rehash and old["stat"] == _json(stat):
                report.unchanged += 1
                continue
            digest = content_hash(files)
            if old is not None and old["content_hash"] == digest:
                upserts.append(("stat", p, stat))  # touched, not changed: refresh the stat only
                report.unchanged += 1
                continue
            try:
                row = describe(p, files, digest, stat, hub_revisions.get(p))
            except LoraMergeError as e:
                if explicit:
                    raise
                report.skipped.append(f"skipped {p}: {e}")
                continue
            upserts.append(("row", p, row))
            (report.updated if old is not None else report.added).append(str(p))
        indexed = set(known) | {str(p) for kind, p, _ in upserts if kind == "row"}
        jobs = [(s, f, h) for s, f, h in jobs if s in indexed]
        profiles, profile_meta = _profiles(jobs, base_path, lib, ray_workers, ray_address, report)
        gone = [(s, v["id"]) for s, v in known.items() if not Path(s).exists()]
        report.removed = [s for s, _ in gone]
        if lib is None:
            lib = Library.open(library, create=True)
        lib.apply([r for kind, _, r in upserts if kind == "row"], [i for _, i in gone],
                  stats={str(p): r for kind, p, r in upserts if kind == "stat"}, profiles=profiles,
                  profile_meta=profile_meta)
        lib.write_index()
        if profile_meta is not None or lib.profile_meta() is not None:
            lib.write_index("profile")
        report.total = len(lib.by_source())
    finally:
        if lib is not None:
            lib.close()
    for line in report.skipped:
        (say or (lambda s: None))(line)
    report.seconds = time.perf_counter() - t0
    return report


def _profile_jobs(examples: Mapping[str, str | Path], found: Sequence[tuple[Path, bool]],
                  known: Mapping[str, Any], lib: Library | None,
                  base: str | Path | None) -> tuple[list[tuple[str, Path, str]], Path | None]:
    """(source, examples file, its hash) for every profile to compute; the resolved base model (or None)."""
    if not examples:
        return [], None
    here = {str(p) for p, _ in found} | set(known)
    stored = lib.profiles() if lib is not None else {}
    meta = lib.profile_meta() if lib is not None else None
    if base is None and meta is None:
        raise LoraMergeError("--examples needs the base model to compute domain profiles: pass --base MODEL "
                             "(a transformers folder, or smollm2-135m)", field="base")
    base_path = resolve_base(str(base)) if base is not None else Path(meta["base"])  # type: ignore[index]
    if meta is not None and Path(meta["base"]).resolve() != base_path.resolve():
        raise LoraMergeError(f"--base {base}: this library's profiles were computed with {meta['base']}; give that "
                             "base model or index into a new library folder", field="base")
    jobs = []
    for src, f in examples.items():
        key = str(Path(src).resolve())
        if key not in here:
            raise LoraMergeError(f"--examples {src}={f}: {src} is not an adapter of this library or of the SOURCES "
                                 "being indexed", field="examples")
        fp = Path(f)
        if not fp.is_file():
            raise LoraMergeError(f"--examples {src}={f}: no such file", field="examples")
        digest = file_hash(fp)
        old = stored.get(key)
        if old is None or old["examples_hash"] != digest or old["examples"] != str(fp.resolve()):
            jobs.append((key, fp.resolve(), digest))
    return jobs, base_path


def _profiles(jobs: Sequence[tuple[str, Path, str]], base: Path | None, lib: Library | None,
              ray_workers: int | None, ray_address: str | None,
              report: IndexReport) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The profile rows of ``jobs`` and the library's profile meta (None when nothing was computed)."""
    if not jobs:
        return [], None
    t0 = time.perf_counter()
    modules, dims, moments = compute_moments([f for _, f, _ in jobs], base, ray_workers=ray_workers,  # type: ignore[arg-type]
                                             ray_address=ray_address)
    meta = {"base": str(base), "modules": modules, "dims": dims, "var_floor": VAR_FLOOR, "max_length": MAX_LENGTH}
    old = lib.profile_meta() if lib is not None else None
    if old is not None and (old["modules"] != modules or old["dims"] != dims):
        raise LoraMergeError(f"{base}: profiles its modules differently from this library's profiles; index into "
                             "a new library folder")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = [{"source": s, "examples": str(f), "examples_hash": h, "tokens": mo.tokens,
             "vector": profile_vector(mo, dims), "indexed_at": now} for (s, f, h), mo in zip(jobs, moments)]
    report.profiled = [s for s, _, _ in jobs]
    report.profile_seconds = time.perf_counter() - t0
    return rows, meta


def _json(value: Any) -> str:
    import json

    return json.dumps(value)
