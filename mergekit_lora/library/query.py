"""Reading a library: ``search`` (nearest by weight signature), ``dedupe``, ``summary`` and ``compose``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraMergeError
from ..evals.suite.model import resolve_base
from ..pipeline import MergePlan, MergeRequest, make_options, plan
from .build import adapter_files, file_stat
from .clusters import clusters, plot_clusters
from .profile import Profiler, per_module_loglik
from .profile import query_vector as profile_query
from .rerank import RERANKS, rerank_scores
from .signature import parts, signature
from .store import Library

DEFAULT_RERANK = "confidence"  # chosen on the validation queries of evals/library/retrieval_eval.py
SHORTLIST = 5
RERANK_WHY = {"confidence": "minus the mean entropy of the next-token distribution at the end of each example",
              "infomax": "the entropy of the mean next-token distribution minus the mean entropy (mutual "
                         "information between example and answer)"}


def query_vector(lib: Library, like: str | Path) -> np.ndarray:
    """The signature of ``like``: the stored one when it is a catalogued adapter unchanged on disk, else computed."""
    p = Path(like)
    if not p.exists():
        from ..sources import did_you_mean

        raise LoraMergeError(f"--like {like}: no such file or folder{did_you_mean(p)}", field="like")
    key = str(p.resolve())
    row = lib.db.execute("SELECT stat, signature FROM adapters WHERE source = ?", (key,)).fetchone()
    if row is not None and row[0] == json.dumps(file_stat(adapter_files(p.resolve()))):
        return np.frombuffer(row[1], dtype=np.float32)
    from ..formats import load_adapter

    return signature(load_adapter(p))[0]


def search(library: str | Path, like: str | Path, top_m: int = 5,
           say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The ``top_m`` catalogued adapters nearest to ``like``, best first: source, score and its two parts."""
    if top_m < 1:
        raise LoraMergeError(f"--top-m must be at least 1 (got {top_m})", field="top_m")
    lib = Library.open(library)
    try:
        index = lib.index(say)
        q = query_vector(lib, like)
        if index.ntotal == 0:
            return []
        scores, ids = index.search(q[None, :].astype(np.float32), min(top_m, index.ntotal))
        rows = {r["id"]: r for r in lib.rows(int(i) for i in ids[0] if i >= 0)}
    finally:
        lib.close()
    out = []
    for score, rid in zip(scores[0], ids[0]):
        if rid < 0:
            continue
        r = rows[int(rid)]
        out.append({"source": r["source"], "score": round(float(score), 6),
                    **{k: round(v, 6) for k, v in parts(q, r["signature"]).items()},
                    "format": r["format"], "base_model": r["base_model"], "ranks": r["ranks"], "card": r["card"]})
    return out


def search_examples(library: str | Path, examples: str | Path, top_m: int = 5, *, base: str | Path | None = None,
                    profiler: Profiler | None = None, rerank: str = DEFAULT_RERANK, shortlist: int = SHORTLIST,
                    say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The ``top_m`` profiled adapters for the unlabeled ``examples``, best first.

    Stage 1 (always): the domain profiles, by the mean log-likelihood of an example token under the adapter's
    input Gaussians per profiled module (the hierarchical router's depth-summed evidence / the module count).
    Stage 2 (``rerank`` ≠ ``none``): the profile's top ``max(shortlist, top_m)`` reordered by each candidate's
    own behaviour on the examples (``library/rerank.py``: ``confidence`` or ``infomax`` of its next-token
    distribution, the candidate attached to the base model).  ``score`` is the statistic the order follows;
    ``profile_score`` is stage 1's; ``why`` names both.  ``profiler``: a loaded base model to reuse."""
    if top_m < 1:
        raise LoraMergeError(f"--top-m must be at least 1 (got {top_m})", field="top_m")
    if rerank not in RERANKS:
        raise LoraMergeError(f"--rerank {rerank}: unknown statistic (choose from {', '.join(RERANKS)})",
                             field="rerank")
    if shortlist < 1:
        raise LoraMergeError(f"--shortlist must be at least 1 (got {shortlist})", field="shortlist")
    want = top_m if rerank == "none" else max(top_m, shortlist)
    if not Path(examples).is_file():
        raise LoraMergeError(f"--examples {examples}: no such file", field="examples")
    lib = Library.open(library)
    try:
        meta = lib.profile_meta()
        if meta is None:
            raise LoraMergeError(f"{library}: the library has no domain profiles; index adapters with "
                                 "`--examples SOURCE=FILE.jsonl --base MODEL` first", field="examples")
        index = lib.index(say, kind="profile")
        prof = profiler or Profiler(resolve_base(str(base)) if base is not None else meta["base"])
        if (prof.modules, prof.dims) != (meta["modules"], meta["dims"]):
            raise LoraMergeError(f"--base {base}: profiles other modules than this library's profiles (made with "
                                 f"{meta['base']}); give that base model", field="base")
        mo = prof.moments(examples)
        q = profile_query(mo)
        if index.ntotal == 0:
            return []
        scores, ids = index.search(q[None, :], min(want, index.ntotal))
        rows = {r["id"]: r for r in lib.rows(int(i) for i in ids[0] if i >= 0)}
        profiled = lib.profiles()
        vecs = {int(i): index.reconstruct(int(i)) for i in ids[0] if i >= 0}
    finally:
        lib.close()
    M = len(meta["modules"])
    per = {i: per_module_loglik(q, v, meta["dims"]) for i, v in vecs.items()}
    mean = np.mean(np.stack(list(per.values())), axis=0) if per else None
    out = []
    for score, rid in zip(scores[0], ids[0]):
        if rid < 0:
            continue
        r = rows[int(rid)]
        lead = per[int(rid)] - mean
        k = int(np.argmax(lead))
        why = (f"profile: mean log-likelihood per token and module of the {mo.tokens} example tokens under the "
               f"adapter's input Gaussians at {M} {meta['modules'][0].rsplit('.', 1)[-1]} inputs (depth-summed "
               f"/ {M}); leads the other hits most at {meta['modules'][k]} ({lead[k]:+.2f})")
        out.append({"source": r["source"], "score": round(float(score) / M, 6), "statistic": "profile",
                    "profile_score": round(float(score) / M, 6),
                    "why": why, "examples": profiled.get(r["source"], {}).get("examples"),
                    "format": r["format"], "base_model": r["base_model"], "ranks": r["ranks"], "card": r["card"]})
    if rerank == "none" or not out:
        return out[:top_m]
    stat = rerank_scores(prof.model, prof.base, [h["source"] for h in out], examples, rerank)
    for h, v, rank in zip(out, stat, range(1, len(out) + 1)):
        h.update(score=round(v, 6), statistic=f"profile+{rerank}",
                 why=f"{rerank}: {RERANK_WHY[rerank]} = {v:+.4f} nats with the adapter attached, rank {rank} of "
                     f"the profile's top {len(out)} (profile score {h['profile_score']:.4f}); {h['why']}")
    order = sorted(range(len(out)), key=lambda i: (-stat[i], i))  # ties: the profile's order
    return [out[i] for i in order[:top_m]]


def dedupe(library: str | Path, threshold: float = 0.99,
           say: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Pairs of catalogued adapters whose signatures score ≥ ``threshold``, highest first."""
    if not 0.0 < threshold <= 1.0:
        raise LoraMergeError(f"--threshold must be in (0, 1] (got {threshold})", field="threshold")
    lib = Library.open(library)
    try:
        index = lib.index(say)
        ids, vecs = lib.vectors()
        sources = {r["id"]: r["source"] for r in lib.rows()}
    finally:
        lib.close()
    if len(ids) < 2:
        return []
    lims, scores, labels = index.range_search(np.ascontiguousarray(vecs), float(threshold) - 1e-6)
    pairs = []
    for qi, a in enumerate(ids):
        for s, b in zip(scores[lims[qi]:lims[qi + 1]], labels[lims[qi]:lims[qi + 1]]):
            if int(b) > int(a) and s >= threshold - 1e-6:
                pairs.append({"a": sources[int(a)], "b": sources[int(b)], "score": round(float(s), 6)})
    return sorted(pairs, key=lambda p: -p["score"])


def summary(library: str | Path, say: Callable[[str], None] | None = None, *, plot: str | Path | None = None,
            k: int | None = None) -> dict[str, Any]:
    """Counts by format, base model and rank; total size; profiles; the signature clusters (k-means, ``k``
    default ≈ √(n/2)) with each cluster's size and the adapter nearest its mean; the index's state (checked,
    rebuilt if needed).  ``plot``: also draw the clusters (2-D PCA of the signatures) into that PNG."""
    lib = Library.open(library)
    try:
        index = lib.index(say)
        rows = lib.rows()
        n_profiles = len(lib.profiles())
        pmeta = lib.profile_meta()
    finally:
        lib.close()
    vecs = np.stack([r["signature"] for r in rows]) if rows else np.zeros((0, 1), dtype=np.float32)
    labels = clusters(vecs, k)
    groups = []
    for c in range(int(labels.max(initial=-1)) + 1):
        members = np.flatnonzero(labels == c)
        centre = vecs[members].mean(0)
        rep = members[int(np.argmax(vecs[members] @ centre))]
        groups.append({"cluster": c, "size": int(len(members)), "representative": rows[rep]["source"]})
    out = {
        "library": str(library), "adapters": len(rows), "indexed_vectors": int(index.ntotal),
        "size_bytes": sum(r["size_bytes"] for r in rows),
        "formats": dict(Counter(r["format"] for r in rows).most_common()),
        "base_models": dict(Counter(r["base_model"] or "(unknown)" for r in rows).most_common()),
        "ranks": dict(Counter(",".join(map(str, r["ranks"])) for r in rows).most_common()),
        "target_modules": dict(Counter(m for r in rows for m in r["target_modules"]).most_common()),
        "profiles": n_profiles, "profile_base": pmeta["base"] if pmeta else None,
        "clusters": groups,
    }
    if plot is not None:
        out["plot"] = plot_clusters([Path(r["source"]).name for r in rows], vecs, labels, plot,
                                    title=f"{library}: {len(rows)} adapters by weight signature")["path"]
    return out


def compose(library: str | Path, method: str, out: str | Path, *, like: str | Path | None = None,
            examples: str | Path | None = None, top_m: int = 3, params: Mapping[str, Any] | None = None,
            options: Any = None, base: str | Path | None = None, rerank: str = DEFAULT_RERANK,
            shortlist: int = SHORTLIST, say: Callable[[str], None] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Retrieve the ``top_m`` adapters (like ``like`` by weight signature, or best explaining ``examples`` by
    domain profile, reranked by ``rerank`` over the profile's top ``shortlist``: see ``search_examples``) and
    merge them with ``method`` (``route``: a training-free routed adapter).

    The card gets a "Library query" section (the query and the retrieved set) inside the atomic write.
    Returns (MergeResult, the retrieved rows)."""
    from ..pipeline import execute

    if (like is None) == (examples is None):
        raise LoraMergeError("give exactly one query: --like ADAPTER or --examples FILE.jsonl", field="like")
    retrieved = (search(library, like, top_m, say) if like is not None
                 else search_examples(library, examples, top_m, base=base, rerank=rerank, shortlist=shortlist,
                                      say=say))  # type: ignore[arg-type]
    if not retrieved:
        raise LoraMergeError(f"{library}: nothing to compose (no adapter matches the query)")
    section = query_section(library, like if like is not None else examples, method, top_m, retrieved,  # type: ignore[arg-type]
                            by="signature" if like is not None else f"profile+{rerank}" if rerank != "none"
                            else "profile")
    return execute(compose_request([r["source"] for r in retrieved], method, params, options, out, section)), \
        retrieved


def compose_request(sources: list[str], method: str, params: Mapping[str, Any] | None, options: Any,
                    out: str | Path, section: tuple[str, str]) -> MergePlan:
    """The one place compose builds its merge request: ``plan()`` of the retrieved sources plus the card section.

    ``plan``/``execute`` are what ``merge()`` runs and what a training-free ``route()`` runs."""
    opts = make_options(options, out=Path(out))
    p = plan(MergeRequest(sources=list(sources), method=method, params=dict(params or {}), options=opts))
    return replace(p, card_sections=tuple(p.card_sections) + (section,))


def query_section(library: str | Path, query: str | Path, method: str, top_m: int,
                  retrieved: list[dict[str, Any]], by: str = "signature") -> tuple[str, str]:
    if by == "signature":
        lines = [f"Composed by `loramerge library compose` from the library `{library}`: the top {top_m} adapters "
                 f"by weight signature like `{query}`, merged with `{method}`.", "",
                 "| # | adapter | score | direction | spectrum |", "|---|---|---|---|---|"]
        lines += [f"| {i} | `{r['source']}` | {r['score']:.4f} | {r['direction']:.4f} | {r['spectrum']:.4f} |"
                  for i, r in enumerate(retrieved, 1)]
    elif by == "profile":
        lines = [f"Composed by `loramerge library compose` from the library `{library}`: the top {top_m} adapters "
                 f"by domain profile for the unlabeled examples `{query}` (score: mean log-likelihood per token "
                 f"and profiled module under each adapter's input Gaussians), merged with `{method}`.", "",
                 "| # | adapter | score | profiled on |", "|---|---|---|---|"]
        lines += [f"| {i} | `{r['source']}` | {r['score']:.4f} | `{r['examples']}` |"
                  for i, r in enumerate(retrieved, 1)]
    else:
        stat = by.split("+", 1)[1]
        lines = [f"Composed by `loramerge library compose` from the library `{library}`: for the unlabeled examples "
                 f"`{query}`, the domain profile's shortlist reranked by {stat} ({RERANK_WHY[stat]}, the adapter "
                 f"attached); the top {top_m}, merged with `{method}`.", "",
                 f"| # | adapter | {stat} | profile score | profiled on |", "|---|---|---|---|---|"]
        lines += [f"| {i} | `{r['source']}` | {r['score']:.4f} | {r['profile_score']:.4f} | `{r['examples']}` |"
                  for i, r in enumerate(retrieved, 1)]
    return ("Library query", "\n".join(lines))
