"""Retrieval quality of the adapter library: the suite's task adapters hidden among >= 200 distractors.

Stages (each cached in the work folder, so a rerun resumes):

1. **build**: example files and distractor adapters (how each kind is made: ``DISTRACTORS`` in library_set.py and the
   results file).  Every adapter's profile examples are 16 rows of a *train* split, formatted as the prompt the
   adapter answers (``before + text + after``, no label).
2. **index**: ``library index`` of ``examples/suite`` and the distractors, with ``--examples`` for every adapter
   and the suite's base model (weight signatures + domain profiles).
3. **retrieve**: for every task and query size k in (8, 32), ``DRAWS`` disjoint sets of k *held-out test*
   prompts (unlabeled) are the query.  *Profile* retrieval: ``search_examples``.  *Signature* retrieval from
   examples (the weight signature is data-free, so the examples are turned into a query adapter first): the
   negative gradient of the causal-LM loss of the query prompts w.r.t. every q/k/v/o weight, truncated to rank 8
   by SVD, signed and searched like ``--like`` — "which adapter makes the change these examples ask for".
   precision@1: the top hit is one of the task's real adapters (any rank); recall@3: the share of the task's
   real adapters among the top 3.
4. **compose**: per task, the first 32-example query's top-m (m = 1 and 3) merged with ``linear`` through
   ``library.compose``, scored on test rows [100, 100 + N) of the task (disjoint from the query rows) with the
   suite harness, against the oracle set (the task's real adapters, ``linear``) and all 12 real adapters.

Run (2-core machine: niced, one thread)::

    OMP_NUM_THREADS=1 nice -n 10 python evals/library/retrieval_eval.py \\
        --work out/libeval --out evals/library/RESULTS-retrieval.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from library_set import (  # the script's folder is on sys.path
    EVAL_FROM,
    REAL,
    RERANK_DRAWS,
    RERANK_SIZES,
    ROOT,
    SHORTLISTS,
    SIGNATURE_DRAWS,
    STATISTICS,
    SUITE,
    VAL_K,
    build,
    queries,
    validation_queries,
)
from retrieval_report import choose, ranked, report, right_sets, score_configs, two_stage_report

from mergekit_lora.adapter import Adapter, AdapterMeta
from mergekit_lora.evals.score_cache import cached_scores
from mergekit_lora.evals.suite.data import get_task
from mergekit_lora.evals.suite.model import resolve_base
from mergekit_lora.evals.tasks import attached, encode_task, load_base, pad_id_of
from mergekit_lora.library import index_sources, search_examples
from mergekit_lora.library.profile import Profiler
from mergekit_lora.library.rerank import answer_distributions, behaviour_score
from mergekit_lora.library.signature import signature
from mergekit_lora.library.store import Library
from mergekit_lora.pipeline import merge
from mergekit_lora.units import RankUnits


def rerank_stage(work: Path, lib: Path, split: str, qs: dict) -> list[dict]:
    """Per query: the profile's top ``max(SHORTLISTS)`` and every candidate's behaviour statistics (one forward
    per candidate, the adapter attached) -- everything the two-stage configurations need."""
    cache = work / f"rerank-{split}.json"
    rows = json.loads(cache.read_text()) if cache.is_file() else []
    done = {(r["task"], r["k"], r["draw"]) for r in rows}
    todo = {key: path for key, path in qs.items()
            if key[1] in RERANK_SIZES and key[2] < RERANK_DRAWS and key not in done}
    if not todo:
        return rows
    prof = Profiler(resolve_base("smollm2-135m"))
    for (task, k, d), path in todo.items():
        t0 = time.perf_counter()
        hits = search_examples(lib, path, top_m=max(SHORTLISTS), profiler=prof, rerank="none")
        t_prof = time.perf_counter() - t0
        stats, secs = [], []
        for h in hits:
            t0 = time.perf_counter()
            with attached(prof.model, h["source"]):
                pr = answer_distributions(prof.model, prof.base, path)
            stats.append({s: behaviour_score(pr, s) for s in STATISTICS})
            secs.append(time.perf_counter() - t0)
        rows.append({"task": task, "k": k, "draw": d, "top": [h["source"] for h in hits], "stats": stats,
                     "profile_seconds": t_prof, "candidate_seconds": secs})
        print(f"{split} {task} k={k} d={d}: profile {Path(hits[0]['source']).name}, conf "
              f"{Path(hits[max(range(len(hits)), key=lambda i: stats[i]['confidence'])]['source']).name}",
              file=sys.stderr, flush=True)
        cache.write_text(json.dumps(rows, indent=1))  # after every query: a rerun resumes
    return rows


def gradient_signature(model, tok, path: Path) -> np.ndarray:
    """The signature of −∇_W (causal-LM loss of the query prompts), rank-8 per q/k/v/o module."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    params = {n: model.get_submodule(n).weight for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model(**enc, labels=labels).loss.backward()
    units = {}
    for n, p in params.items():
        U, S, V = torch.svd_lowrank(-p.grad.double(), q=8, niter=4)
        units[f"base_model.model.{n}"] = RankUnits.from_factors((S.sqrt()[:, None] * V.T).float(),
                                                                (U * S.sqrt()).float())
        p.requires_grad_(False)
        p.grad = None
    return signature(Adapter.from_units(units, AdapterMeta("memory")))[0]


def retrieve(work: Path, lib: Path, info: dict, qs: dict) -> list[dict]:
    cache = work / "retrieval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    import faiss

    base = resolve_base("smollm2-135m")
    prof = Profiler(base)
    model, tok = load_base("smollm2-135m", torch.device("cpu"))
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    db = Library.open(lib)
    ids, vecs = db.vectors()
    src = {r["id"]: r["source"] for r in db.rows()}
    db.close()
    sig = faiss.IndexFlatIP(vecs.shape[1])
    sig.add(np.ascontiguousarray(vecs))
    rows = []
    for (task, k, d), path in qs.items():
        right = {str((SUITE / r).resolve()) for r in REAL[task]}
        t0 = time.perf_counter()
        hits = [h["source"] for h in search_examples(lib, path, top_m=3, profiler=prof)]
        t_prof = time.perf_counter() - t0
        found = [("profile", hits, t_prof)]
        if d < SIGNATURE_DRAWS:
            t0 = time.perf_counter()
            q = gradient_signature(model, tok, path)
            _, top = sig.search(q[None, :], 3)
            found.append(("signature", [src[int(ids[i])] for i in top[0]], time.perf_counter() - t0))
        for method, h, secs in found:
            rows.append({"task": task, "k": k, "draw": d, "method": method, "top": h, "seconds": secs,
                         "p1": int(h[0] in right), "r3": len(right & set(h)) / len(right)})
        print(f"{task} k={k} d={d}: " + ", ".join(f"{m} {Path(h[0]).name}" for m, h, _ in found), file=sys.stderr,
              flush=True)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def compose_eval(work: Path, ranked_sets: dict[str, list[str]], n_eval: int) -> list[dict]:
    """Per task: ``linear`` merges of the chosen configuration's top 1 and top 3 (its first 32-example test query),
    the oracle set (the task's real adapters) and all 12 real adapters, scored on test rows EVAL_FROM.. ."""
    cache = work / "compose.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model, tok = load_base("smollm2-135m", torch.device("cpu"))
    base = resolve_base("smollm2-135m")
    ev = {"batch_size": 16, "device": torch.device("cpu"), "pad_id": pad_id_of(tok)}
    out_root = work / "composed"
    out_root.mkdir(exist_ok=True)
    all_dir = out_root / "all-12"
    if not all_dir.is_dir():
        merge([str((SUITE / r).resolve()) for rs in REAL.values() for r in rs], "linear", all_dir)
    rows = []
    for task in REAL:
        t = get_task(task)
        enc = {task: encode_task(t, tok, t.test()[EVAL_FROM:EVAL_FROM + n_eval])}
        right = [str((SUITE / r).resolve()) for r in REAL[task]]
        oracle = out_root / f"oracle-{task}"
        if not oracle.is_dir():
            merge(right, "linear", oracle)
        variants = {"oracle": (oracle, right), "all-12": (all_dir, None)}
        for m in (1, 3):
            hits = ranked_sets[task][:m]
            dst = out_root / f"rr-top{m}-{task}"
            if not dst.is_dir():
                merge(hits, "linear", dst)
            variants[f"top-{m}"] = (dst, hits)
        for name, (folder, chosen) in variants.items():
            with torch.no_grad():
                sc = cached_scores(model, base, folder, enc, **ev)[0][task]
            rows.append({"task": task, "variant": name, "accuracy": sc["accuracy"], "correct": sc["correct"],
                         "n": n_eval, "chosen": chosen})
            print(f"{task} {name}: {sc['accuracy']:.3f}", file=sys.stderr, flush=True)
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "libeval")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--n-eval", type=int, default=40)
    ap.add_argument("--stage", choices=("build", "index", "retrieve", "val", "test", "all"), default="all",
                    help="stop after this stage (val/test: only that split's two-stage candidates, for running the "
                         "two in parallel)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    info = build(a.work)
    if a.stage == "build":
        return
    lib = a.work / "lib"
    idx = a.work / "index.json"
    if not idx.is_file():
        t0 = time.perf_counter()
        r = index_sources([str(SUITE), str(a.work / "distractors")], lib, examples=info["examples"],
                          base="smollm2-135m", say=lambda s: print(s, file=sys.stderr))
        idx.write_text(json.dumps({"seconds": time.perf_counter() - t0, "total": r.total}))
    ix = json.loads(idx.read_text())
    if a.stage == "index":
        return
    qs = queries(a.work)
    ret = retrieve(a.work, lib, info, qs)
    head = report(info, ret, [], ix["seconds"], ix["total"], a.n_eval).split("### Compose")[0]
    if a.stage == "retrieve":
        print(head)
        return
    if a.stage in ("val", "all"):
        val = rerank_stage(a.work, lib, "val", validation_queries(a.work, info))
    if a.stage in ("test", "all"):
        test = [r for r in rerank_stage(a.work, lib, "test", qs) if r["draw"] < RERANK_DRAWS]
    if a.stage != "all":
        return
    strict, group = right_sets(lib)
    pick = choose(score_configs(val, strict, group, VAL_K))
    text = head + two_stage_report(val, test, strict, group, [], a.n_eval, lib)
    if a.out:
        a.out.write_text(text)
    first = {r["task"]: ranked(r, *pick) for r in test if r["k"] == 32 and r["draw"] == 0}
    comp = compose_eval(a.work, first, a.n_eval)
    text = head + two_stage_report(val, test, strict, group, comp, a.n_eval, lib)
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
