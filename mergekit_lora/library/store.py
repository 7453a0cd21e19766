"""A library folder on disk: ``catalogue.sqlite`` (the truth), ``signatures.faiss`` and ``profiles.faiss`` (derived).

The catalogue holds one row per adapter, its signature vector included, and is changed in one SQLite
transaction per ``index`` run: a crash leaves the previous catalogue or the new one, never a mix.  The faiss
file (``IndexIDMap2`` over ``IndexFlatIP``, ids = catalogue row ids) is written to a temporary name and
moved over the old one with ``os.replace``; on open it is checked against the catalogue (dimension, count,
ids) and, when it is missing, unreadable or stale, rebuilt from the stored vectors with one line saying so.
Domain profiles (``library/profile.py``) are rows of ``profiles`` keyed by adapter source, indexed the same way
in ``profiles.faiss`` (dimension from the ``profile`` meta entry).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraMergeError
from .signature import DIM, VERSION

CATALOGUE = "catalogue.sqlite"
INDEX = "signatures.faiss"
PROFILE_INDEX = "profiles.faiss"

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL UNIQUE,      -- absolute local path
    revision TEXT,                    -- Hub revision (local sources: NULL)
    format TEXT NOT NULL,
    base_model TEXT,
    ranks TEXT NOT NULL,              -- JSON: the distinct ranks, ascending
    target_modules TEXT NOT NULL,     -- JSON: the distinct module kinds (last name part)
    modules INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    content_hash TEXT NOT NULL,       -- blake2b of the weight and config files
    stat TEXT NOT NULL,               -- JSON [[name, size, mtime_ns], ...]: the fast "unchanged" check
    card TEXT,                        -- first heading or line of README.md
    norm REAL NOT NULL,               -- ‖ΔW‖ over all modules
    signature BLOB NOT NULL,          -- float32 [dim]
    indexed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS profiles (
    source TEXT PRIMARY KEY,          -- the adapter's source (a row of adapters)
    examples TEXT NOT NULL,           -- the JSONL file of unlabeled examples it was fitted on
    examples_hash TEXT NOT NULL,      -- blake2b of that file
    tokens INTEGER NOT NULL,          -- real tokens seen
    vector BLOB NOT NULL,             -- float32 [2D + 1]: μ/σ², −½/σ², constant (library/profile.py)
    indexed_at TEXT NOT NULL
);
"""

COLUMNS = ("source", "revision", "format", "base_model", "ranks", "target_modules", "modules", "size_bytes",
           "content_hash", "stat", "card", "norm", "signature", "indexed_at")


@dataclass
class Library:
    path: Path
    db: sqlite3.Connection

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> Library:
        p = Path(path)
        if not (p / CATALOGUE).is_file():
            if not create:
                why = "not a folder" if not p.is_dir() else f"no {CATALOGUE} in it"
                raise LoraMergeError(f"{p}: not a library ({why}); make one with `loramerge library index "
                                     f"SOURCES... -o {p}`")
            cls.check_new(p)
            p.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(p / CATALOGUE, isolation_level=None, timeout=60)  # transactions are explicit (BEGIN)
            db.executescript(SCHEMA)
            lib = cls(p, db)
            stored = lib.meta("signature")
            want = f"v{VERSION}:{DIM}"
            if stored is None:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('signature', ?)", (want,))
            elif stored != want:
                raise LoraMergeError(f"{p}: signatures are {stored}, this loramerge computes {want}; "
                                     "index into a new library folder")
        except sqlite3.DatabaseError as e:
            raise LoraMergeError(f"{p / CATALOGUE}: not a readable SQLite catalogue ({e})") from None
        return lib

    @staticmethod
    def check_new(p: Path) -> None:
        """Refuse to make a library in a file or in a folder that holds other things (an adapter folder)."""
        if p.exists() and not p.is_dir():
            raise LoraMergeError(f"{p}: exists and is not a folder; give a library folder to -o")
        if p.is_dir() and any(p.iterdir()):
            raise LoraMergeError(f"{p}: a folder with other files and no {CATALOGUE}; give -o a new or "
                                 "empty folder, or an existing library")

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ rows
    def rows(self, ids: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Catalogue rows (all, or those with ``ids``), in id order."""
        where = "" if ids is None else f" WHERE id IN ({', '.join(str(int(i)) for i in ids) or 'NULL'})"
        cur = self.db.execute(f"SELECT id, {', '.join(COLUMNS)} FROM adapters{where} ORDER BY id")
        names = [d[0] for d in cur.description]
        out = []
        for r in cur.fetchall():
            row = dict(zip(names, r))
            row["ranks"] = json.loads(row["ranks"])
            row["target_modules"] = json.loads(row["target_modules"])
            row["signature"] = np.frombuffer(row["signature"], dtype=np.float32)
            out.append(row)
        return out

    def by_source(self) -> dict[str, dict[str, Any]]:
        cur = self.db.execute("SELECT id, source, content_hash, stat FROM adapters")
        return {s: {"id": i, "content_hash": h, "stat": st} for i, s, h, st in cur.fetchall()}

    def apply(self, upserts: Iterable[dict[str, Any]], removed: Iterable[int],
              stats: dict[str, Any] | None = None, profiles: Iterable[dict[str, Any]] = (),
              profile_meta: dict[str, Any] | None = None) -> None:
        """Insert/replace rows, delete ids (and their profiles), refresh stats, set profiles: one transaction."""
        try:
            self.db.execute("BEGIN IMMEDIATE")  # waits up to 60 s for another writer
        except sqlite3.OperationalError as e:
            raise LoraMergeError(f"{self.path / CATALOGUE}: cannot start a transaction ({e}); is another "
                                 "`library index` running on it?") from None
        try:
            for source, stat in (stats or {}).items():
                self.db.execute("UPDATE adapters SET stat = ? WHERE source = ?", (json.dumps(stat), source))
            for rid in removed:
                self.db.execute("DELETE FROM profiles WHERE source IN (SELECT source FROM adapters WHERE id = ?)",
                                (rid,))
                self.db.execute("DELETE FROM adapters WHERE id = ?", (rid,))
            if profile_meta is not None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('profile', ?)", (json.dumps(profile_meta),))
            for pr in profiles:
                self.db.execute("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?, ?)",
                                (pr["source"], pr["examples"], pr["examples_hash"], pr["tokens"],
                                 pr["vector"].astype(np.float32).tobytes(), pr["indexed_at"]))
            for row in upserts:
                values = [json.dumps(row[c]) if c in ("ranks", "target_modules", "stat") else
                          (row[c].astype(np.float32).tobytes() if c == "signature" else row[c]) for c in COLUMNS]
                self.db.execute("DELETE FROM adapters WHERE source = ?", (row["source"],))
                self.db.execute(f"INSERT INTO adapters ({', '.join(COLUMNS)}) VALUES "
                                f"({', '.join('?' * len(COLUMNS))})", values)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ profiles
    def profile_meta(self) -> dict[str, Any] | None:
        """How the profiles were computed (base model, modules, dims, ...), or None when there are none."""
        v = self.meta("profile")
        return None if v is None else json.loads(v)

    def profiles(self) -> dict[str, dict[str, Any]]:
        """source -> {examples, examples_hash, tokens} (no vectors)."""
        cur = self.db.execute("SELECT source, examples, examples_hash, tokens FROM profiles")
        return {s: {"examples": e, "examples_hash": h, "tokens": t} for s, e, h, t in cur.fetchall()}

    # ------------------------------------------------------------------ the faiss indexes
    def vectors(self, kind: str = "signature") -> tuple[np.ndarray, np.ndarray]:
        """(ids [n] int64, vectors [n, dim] float32) from the catalogue, in id order: signatures or profiles."""
        if kind == "signature":
            rows = self.db.execute("SELECT id, signature FROM adapters ORDER BY id").fetchall()
        else:
            rows = self.db.execute("SELECT a.id, p.vector FROM profiles p JOIN adapters a ON a.source = p.source "
                                   "ORDER BY a.id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = (np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows
                else np.zeros((0, self._dim(kind)), dtype=np.float32))
        return ids, vecs

    def _dim(self, kind: str) -> int:
        if kind == "signature":
            return DIM
        pm = self.profile_meta()
        return 2 * sum(pm["dims"]) + 1 if pm else 1

    def write_index(self, kind: str = "signature") -> Any:
        """Build a faiss index from the catalogue and replace its file atomically; returns the index."""
        import faiss

        ids, vecs = self.vectors(kind)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(self._dim(kind)))
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vecs), ids)
        final = self.path / (INDEX if kind == "signature" else PROFILE_INDEX)
        tmp = self.path / f".{final.name}.{os.getpid()}.tmp"
        try:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return index

    def index(self, say: Callable[[str], None] | None = None, kind: str = "signature") -> Any:
        """A faiss index, checked against the catalogue; a missing/corrupt/stale one is rebuilt (one line)."""
        import faiss

        if kind == "signature":
            ids = np.array([r[0] for r in self.db.execute("SELECT id FROM adapters ORDER BY id")], dtype=np.int64)
        else:
            ids = self.vectors(kind)[0]
        p = self.path / (INDEX if kind == "signature" else PROFILE_INDEX)
        why = None
        if not p.is_file():
            why = "missing"
        else:
            try:
                index = faiss.read_index(str(p))
                got = np.sort(faiss.vector_to_array(index.id_map).astype(np.int64)) if hasattr(index, "id_map") \
                    else None
                if index.d != self._dim(kind) or got is None:
                    why = "of another layout"
                elif index.ntotal != len(ids) or not np.array_equal(got, ids):
                    what = "adapters" if kind == "signature" else "profiles"
                    why = f"stale ({index.ntotal} vectors, the catalogue has {len(ids)} {what})"
            except RuntimeError:
                why = "unreadable"
        if why is None:
            return index
        (say or _stderr)(f"library: {p} was {why}; rebuilt from the catalogue ({len(ids)} vectors)")
        return self.write_index(kind)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
