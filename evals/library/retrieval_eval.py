"""Retrieval quality of the adapter library: the suite's task adapters hidden among >= 200 distractors.

Stages (each cached in the work folder, so a rerun resumes):

1. **build**: example files and distractor adapters (how each kind is made: ``DISTRACTORS`` below and the
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
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mergekit_lora.adapter import Adapter, AdapterMeta
from mergekit_lora.evals.score_cache import cached_scores
from mergekit_lora.evals.suite.data import get_task
from mergekit_lora.evals.suite.model import resolve_base
from mergekit_lora.evals.tasks import attached, encode_task, load_base, pad_id_of
from mergekit_lora.library import dedupe, index_sources, search_examples
from mergekit_lora.library.profile import Profiler
from mergekit_lora.library.rerank import answer_distributions, behaviour_score
from mergekit_lora.library.signature import signature
from mergekit_lora.library.store import Library
from mergekit_lora.pipeline import merge
from mergekit_lora.units import RankUnits

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "examples" / "suite"
REAL = {"topic": ["topic"], "sentiment": ["sentiment"], "genre": ["genre"], "language": ["language"],
        "script": ["script", "r4/script"], "polarity": ["polarity"], "region": ["region", "r16/region", "r4/region"],
        "subject": ["subject", "r16/subject"]}
PROFILE_ROWS = 16
SIZES = (8, 32)
DRAWS = 2
SIGNATURE_DRAWS = 1  # the gradient query costs a full forward + backward: one draw per task and k
TEXT_CHARS = 120
EVAL_FROM = 100
DISTRACTORS = """\
- **class slices** (41, one per class of each task): profile examples = 16 train rows of that one class in the
  task's own prompt; weights = a near-duplicate of the task's r = 8 adapter (every factor + Gaussian noise of
  10-50 % of its RMS, seeded): a narrower adapter derived from the right one — the hardest kind for both methods.
- **cross-template** (56, every ordered pair of tasks): task X's train texts in task Y's prompt; weights =
  random directions with Y's adapter's spectrum (per module: the singular values of Y's ΔW on random orthonormal
  bases).
- **shuffled words** (32, 4 seeds per task): a task's train texts with their words shuffled, in its own prompt;
  weights = a near-duplicate (20 % noise) of another task's adapter.
- **other text** (80): sets of 16 docstring sentences of Python standard-library modules (one module, or a few
  consecutive small ones, per set), no prompt; weights = random directions with the spectrum of a random real
  adapter.
"""


def prompt(task: str, text: str) -> str:
    t = get_task(task)
    return t.before + text[:TEXT_CHARS] + t.after


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _copy_config(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")


def near_duplicate(src: Path, dst: Path, noise: float, seed: int) -> None:
    if (dst / "adapter_model.safetensors").is_file():  # made by an earlier run (same seed: same bytes)
        return
    g = torch.Generator().manual_seed(seed)
    t = load_file(str(src / "adapter_model.safetensors"))
    out = {}
    for k in sorted(t):
        v = t[k].float()
        rms = v.pow(2).mean().sqrt()
        out[k] = (v + noise * rms * torch.randn(v.shape, generator=g)).to(t[k].dtype)
    _copy_config(src, dst, out)


def spectrum_matched(src: Path, dst: Path, seed: int) -> None:
    """Per module: ΔW's singular values (from the factors) on random orthonormal bases, split evenly into A, B."""
    if (dst / "adapter_model.safetensors").is_file():
        return
    g = torch.Generator().manual_seed(seed)
    t = load_file(str(src / "adapter_model.safetensors"))
    out = {}
    for ka in sorted(k for k in t if "lora_A" in k):
        kb = ka.replace("lora_A", "lora_B")
        A, B = t[ka].float(), t[kb].float()
        s = torch.linalg.svdvals(B @ A)[: A.shape[0]]
        U, _ = torch.linalg.qr(torch.randn(B.shape[0], A.shape[0], generator=g))
        V, _ = torch.linalg.qr(torch.randn(A.shape[1], A.shape[0], generator=g))
        out[kb] = (U * s.sqrt()).to(t[kb].dtype).contiguous()
        out[ka] = (s.sqrt()[:, None] * V.T).to(t[ka].dtype).contiguous()
    _copy_config(src, dst, out)


SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3",
                "ensurepip", "venv", "webbrowser", "pty", "tty", "curses", "readline", "msvcrt", "winreg",
                "winsound", "nt", "_winapi"}


def stdlib_sentences(n_sets: int, seed: int) -> list[list[str]]:
    """``n_sets`` sets of 16 docstring sentences (>= 4 words) of standard-library modules, taken in a shuffled
    module order (a set spans one module, or a few consecutive small ones)."""
    import importlib
    import warnings

    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    rnd = random.Random(seed)
    rnd.shuffle(names)
    pool: list[str] = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that does not import cleanly here is just not used
            continue
        docs = [d for d in [mod.__doc__] + [getattr(v, "__doc__", None) for v in vars(mod).values()
                                            if callable(v) and getattr(v, "__module__", None) == name]
                if isinstance(d, str)]
        pool += [" ".join(s.split())[:TEXT_CHARS] for d in docs for s in d.split(". ") if len(s.split()) >= 4]
        if len(pool) >= n_sets * PROFILE_ROWS:
            break
    return [pool[i:i + PROFILE_ROWS] for i in range(0, n_sets * PROFILE_ROWS, PROFILE_ROWS)
            if len(pool[i:i + PROFILE_ROWS]) == PROFILE_ROWS]


def build(work: Path) -> dict:
    done = work / "build.json"
    if done.is_file():
        return json.loads(done.read_text())
    dis, ex = work / "distractors", work / "examples"
    real = {}
    for task, rels in REAL.items():
        rows = [prompt(task, e.text) for e in get_task(task).validation(PROFILE_ROWS)]
        for rel in rels:
            real[str((SUITE / rel).resolve())] = str(write_jsonl(ex / "real" / f"{rel.replace('/', '-')}.jsonl", rows))
    examples = dict(real)
    kinds: dict[str, str] = {}
    rnd = random.Random(0)
    seed = 100
    tasks = list(REAL)
    for task in tasks:  # class slices
        t = get_task(task)
        train = t.split()[0]
        for c, label in enumerate(t.labels):
            rows = [prompt(task, e.text) for e in train if e.label == c][:PROFILE_ROWS]
            name = f"slice-{task}-{label.strip().replace(' ', '_')}"
            near_duplicate(SUITE / task, dis / name, rnd.uniform(0.1, 0.5), seed := seed + 1)
            examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", rows))
            kinds[str((dis / name).resolve())] = "class slice"
    for x in tasks:  # cross-template
        texts = [e.text for e in get_task(x).validation(PROFILE_ROWS)]
        for y in tasks:
            if x == y:
                continue
            name = f"cross-{x}-in-{y}"
            spectrum_matched(SUITE / y, dis / name, seed := seed + 1)
            examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", [prompt(y, s) for s in texts]))
            kinds[str((dis / name).resolve())] = "cross-template"
    for task in tasks:  # shuffled words
        for k in range(4):
            r = random.Random(1000 + k)
            texts = []
            for e in get_task(task).validation(PROFILE_ROWS):
                words = e.text.split()
                r.shuffle(words)
                texts.append(prompt(task, " ".join(words)))
            other = rnd.choice([t for t in tasks if t != task])
            name = f"shuffled-{task}-{k}"
            near_duplicate(SUITE / other, dis / name, 0.2, seed := seed + 1)
            examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", texts))
            kinds[str((dis / name).resolve())] = "shuffled words"
    for i, sents in enumerate(stdlib_sentences(80, 0)):  # other text
        name = f"other-{i:02d}"
        spectrum_matched(SUITE / rnd.choice(tasks), dis / name, seed := seed + 1)
        examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", sents))
        kinds[str((dis / name).resolve())] = "other text"
    info = {"examples": examples, "kinds": kinds, "real": real}
    done.write_text(json.dumps(info, indent=1))
    return info


def queries(work: Path) -> dict[tuple[str, int, int], Path]:
    out = {}
    for task in REAL:
        test = get_task(task).test()
        for k in SIZES:
            for d in range(DRAWS):
                rows = [prompt(task, e.text) for e in test[d * k:(d + 1) * k]]
                out[(task, k, d)] = write_jsonl(work / "queries" / f"{task}-{k}-{d}.jsonl", rows)
    return out


SHORTLISTS = (3, 5)
STATISTICS = ("confidence", "infomax")
VAL_DRAWS = 1
RERANK_SIZES = SIZES
RERANK_DRAWS = DRAWS
VAL_K = 32


def validation_queries(work: Path, info: dict) -> dict[tuple[str, int, int], Path]:
    """``VAL_DRAWS`` sets of ``VAL_K`` prompts per task from the *train* split's end, none of them a profile row
    of any adapter: the queries every knob (statistic, shortlist) is chosen on."""
    used = {json.loads(line)["text"] for f in info["examples"].values() for line in Path(f).read_text().splitlines()}
    out = {}
    for task in REAL:
        rows = [prompt(task, e.text) for e in reversed(get_task(task).split()[0])]
        rows = [r for r in rows if r not in used][:VAL_DRAWS * VAL_K]
        for d in range(VAL_DRAWS):
            out[(task, VAL_K, d)] = write_jsonl(work / "val-queries" / f"{task}-{VAL_K}-{d}.jsonl",
                                                rows[d * VAL_K:(d + 1) * VAL_K])
    return out


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


def ranked(row: dict, statistic: str, m: int) -> list[str]:
    """The order a configuration returns: the profile's order (``none``) or its top ``m`` by ``statistic``."""
    if statistic == "none":
        return row["top"]
    idx = sorted(range(min(m, len(row["top"]))), key=lambda i: (-row["stats"][i][statistic], i))
    return [row["top"][i] for i in idx]


def right_sets(lib: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(strict, group) right adapters per task: the task's real adapters; plus every adapter ``library dedupe``
    (default threshold) pairs with one of them."""
    pairs = dedupe(lib)
    strict = {task: {str((SUITE / r).resolve()) for r in REAL[task]} for task in REAL}
    group = {}
    for task, right in strict.items():
        g = set(right)
        for p in pairs:
            if p["a"] in right or p["b"] in right:
                g |= {p["a"], p["b"]}
        group[task] = g
    return strict, group


def configs() -> list[tuple[str, int]]:
    return [("none", max(SHORTLISTS))] + [(s, m) for s in STATISTICS for m in SHORTLISTS]


def score_configs(rows: list[dict], strict: dict, group: dict, k: int) -> dict[tuple[str, int], dict[str, float]]:
    out = {}
    for stat, m in configs():
        rs = [r for r in rows if r["k"] == k]
        tops = [ranked(r, stat, m) for r in rs]
        out[(stat, m)] = {
            "strict": float(np.mean([t[0] in strict[r["task"]] for r, t in zip(rs, tops)])),
            "group": float(np.mean([t[0] in group[r["task"]] for r, t in zip(rs, tops)])),
            "r3": float(np.mean([len(strict[r["task"]] & set(t[:3])) / len(strict[r["task"]])
                                 for r, t in zip(rs, tops)])),
            "n": len(rs)}
    return out


def choose(val: dict[tuple[str, int], dict[str, float]]) -> tuple[str, int]:
    """The validation's best strict precision@1, ties: group precision@1, then the smaller shortlist."""
    return max(val, key=lambda c: (val[c]["strict"], val[c]["group"], -c[1]))


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


def paired_ci(comp: list[dict], a: str, b: str, reps: int = 10000) -> tuple[float, float, float]:
    """(mean of a − b over all scored rows, 95 % paired bootstrap interval) in accuracy points."""
    xa = np.array([int(c) for task in REAL for r in comp if r["task"] == task and r["variant"] == a
                   for c in r["correct"]])
    xb = np.array([int(c) for task in REAL for r in comp if r["task"] == task and r["variant"] == b
                   for c in r["correct"]])
    d = (xa - xb).astype(float)
    rng = np.random.default_rng(0)
    boots = d[rng.integers(0, len(d), (reps, len(d)))].mean(1)
    return 100 * d.mean(), 100 * np.quantile(boots, 0.025), 100 * np.quantile(boots, 0.975)


def report(info: dict, ret: list[dict], comp: list[dict], index_s: float, n_adapters: int, n_eval: int) -> str:
    from collections import Counter

    kinds = Counter(info["kinds"].values())
    lines = ["| method | k | precision@1 | recall@3 | queries | query seconds (median) |", "|---|---|---|---|---|---|"]
    for method in ("signature", "profile"):
        for k in SIZES:
            rs = [r for r in ret if r["method"] == method and r["k"] == k]
            lines.append(f"| {method} | {k} | {np.mean([r['p1'] for r in rs]):.3f} | {np.mean([r['r3'] for r in rs]):.3f}"
                         f" | {len(rs)} | {np.median([r['seconds'] for r in rs]):.2f} |")
    per = ["| task | " + " | ".join(f"{m} k={k}" for m in ("signature", "profile") for k in SIZES) + " |",
           "|---|" + "---|" * 4]
    for task in REAL:
        cells = []
        for m in ("signature", "profile"):
            for k in SIZES:
                rs = [r for r in ret if r["method"] == m and r["k"] == k and r["task"] == task]
                cells.append(f"{sum(r['p1'] for r in rs)}/{len(rs)}")
        per.append(f"| {task} | " + " | ".join(cells) + " |")
    wrong = Counter(info["kinds"].get(r["top"][0], "real, other task") for r in ret if not r["p1"] and r["method"] == "profile")
    if not comp:
        comp_lines = ["(not run)"]
        return _join(info, kinds, lines, per, wrong, comp_lines, index_s, n_adapters, n_eval)
    comp_lines = ["| task | oracle (its real adapters) | top-1 | top-3 | all 12 | top-3 set |", "|---|---|---|---|---|---|"]
    for task in REAL:
        acc = {r["variant"]: r for r in comp if r["task"] == task}
        names = ", ".join(Path(s).parent.name + "/" + Path(s).name if "r16" in s or "r4" in s else Path(s).name
                          for s in acc["top-3"]["chosen"])
        comp_lines.append(f"| {task} | {acc['oracle']['accuracy']:.3f} | {acc['top-1']['accuracy']:.3f} | "
                          f"{acc['top-3']['accuracy']:.3f} | {acc['all-12']['accuracy']:.3f} | {names} |")
    mean = {v: np.mean([r["accuracy"] for r in comp if r["variant"] == v]) for v in ("oracle", "top-1", "top-3", "all-12")}
    comp_lines.append(f"| **mean** | {mean['oracle']:.3f} | {mean['top-1']:.3f} | {mean['top-3']:.3f} | "
                      f"{mean['all-12']:.3f} | |")
    return _join(info, kinds, lines, per, wrong, comp_lines, index_s, n_adapters, n_eval)


def _join(info: dict, kinds, lines, per, wrong, comp_lines, index_s, n_adapters, n_eval) -> str:  # noqa: ANN001
    return "\n".join([
        f"Library: {n_adapters} adapters = the suite's 12 real task adapters + {sum(kinds.values())} distractors "
        f"({', '.join(f'{k} {v}' for k, v in kinds.items())}); indexing (signatures + profiles) took {index_s:.0f} s.",
        "", "Distractors:", "", DISTRACTORS, "### Retrieval", "", *lines, "",
        f"Per task, top-1 correct / queries ({DRAWS} disjoint draws of k held-out test prompts per task and k for "
        f"profiles, {SIGNATURE_DRAWS} for signatures):", "",
        *per, "", f"Wrong profile top-1 hits by kind: {dict(wrong) or 'none'}.", "",
        f"### Compose (linear), accuracy on {n_eval} test rows per task ({EVAL_FROM}..{EVAL_FROM + n_eval - 1}; "
        "queries used rows 0..31)", "", *comp_lines, ""])


def slice_cosines(lib: Path) -> np.ndarray:
    """The weight-signature cosine of every class-slice distractor with the task adapter it was derived from."""
    db = Library.open(lib)
    sig = {r["source"]: r["signature"] for r in db.rows()}
    db.close()
    return np.array([float(v @ sig[str((SUITE / Path(src).name.split("-")[1]).resolve())])
                     for src, v in sig.items() if Path(src).name.startswith("slice-")])


def derived_p1(rows: list[dict], strict: dict, pick: tuple[str, int], k: int) -> float:
    """Top-1 is a real adapter of the task or one of the task's class slices (noisy copies of its r = 8 adapter)."""
    rs = [r for r in rows if r["k"] == k]
    return float(np.mean([(t := ranked(r, *pick)[0]) in strict[r["task"]]
                          or Path(t).name.startswith(f"slice-{r['task']}-") for r in rs]))


def two_stage_report(val: list[dict], test: list[dict], strict: dict, group: dict, comp: list[dict],
                     n_eval: int, lib: Path) -> str:
    vs = score_configs(val, strict, group, VAL_K)
    pick = choose(vs)
    ts = {k: score_configs(test, strict, group, k) for k in RERANK_SIZES}
    n_group = sum(len(group[t] - strict[t]) for t in REAL)
    name = {"none": "profile only"}
    lines = ["### Two-stage retrieval: profile shortlist, reranked by the candidate's behaviour", "",
             f"Strict precision@1: the top hit is one of the task's real adapters. Group precision@1: or an adapter "
             f"that `library dedupe` (default threshold 0.99) pairs with one of them ({n_group} such near-duplicates "
             f"in this library). recall@3: strict. Validation: {VAL_DRAWS} draw(s) of {VAL_K} train-split prompts per "
             f"task that are no adapter's profile rows; test: the held-out test prompts of the retrieval table "
             f"above (the same {DRAWS} draws per k).", "",
             "| configuration | shortlist M | val k=32 strict p@1 | val k=32 group p@1 | "
             + " | ".join(f"test k={k} strict p@1 | test k={k} group p@1 | test k={k} recall@3" for k in RERANK_SIZES)
             + " |", "|---|---|---|---|" + "---|---|---|" * len(RERANK_SIZES)]
    for c in configs():
        mark = " **(chosen on validation)**" if c == pick else ""
        v = vs[c]
        lines.append(f"| {name.get(c[0], 'profile + ' + c[0])}{mark} | {c[1] if c[0] != 'none' else '-'} | "
                     f"{v['strict']:.3f} | {v['group']:.3f} | "
                     + " | ".join(f"{ts[k][c]['strict']:.3f} | {ts[k][c]['group']:.3f} | {ts[k][c]['r3']:.3f}"
                                  for k in RERANK_SIZES) + " |")
    per = ["", "Per task, chosen configuration on the test queries (strict top-1 correct / queries; the wrong top-1):",
           "", "| task | " + " | ".join(f"k={k}" for k in RERANK_SIZES) + " | wrong top-1s at k=32 |",
           "|---|" + "---|" * len(RERANK_SIZES) + "---|"]
    for task in REAL:
        cells, wrong = [], []
        for k in RERANK_SIZES:
            rs = [r for r in test if r["task"] == task and r["k"] == k]
            tops = [ranked(r, *pick)[0] for r in rs]
            cells.append(f"{sum(t in strict[task] for t in tops)}/{len(rs)}")
            if k == 32:
                wrong = [Path(t).name for t in tops if t not in strict[task]]
        per.append(f"| {task} | {' | '.join(cells)} | {', '.join(wrong) or '-'} |")
    secs = [s for r in test for s in r["candidate_seconds"]]
    cost = ["", f"Cost: one candidate (attach with PEFT + one forward of the query + detach) took "
            f"{np.median([s for r in test if r['k'] == 32 for s in r['candidate_seconds']]):.2f} s median at k=32 "
            f"({np.median(secs):.2f} s over all queries) on the loaded machine; the profile stage "
            f"{np.median([r['profile_seconds'] for r in test]):.2f} s median.", ""]
    cos = slice_cosines(lib)
    derived = ["", f"Diagnostic, not a goal metric: every class slice is a noisy copy of its task's r = 8 adapter "
               f"(signature cosine to it {cos.min():.3f}–{cos.max():.3f}, median {np.median(cos):.3f}, so `dedupe`'s "
               f"0.99 flags {int((cos >= 0.99).sum())} of {len(cos)}). Counting a top-1 that is the task's own class "
               f"slice as right, the chosen configuration's precision@1 is {derived_p1(val, strict, pick, VAL_K):.3f} "
               f"on validation and " + ", ".join(f"{derived_p1(test, strict, pick, k):.3f} at k={k}"
                                                for k in RERANK_SIZES) + " on test."]
    out = lines + per + derived + cost
    if comp:
        out += [f"### Compose (linear), the chosen configuration's top-m from the first 32-example test query; "
                f"accuracy on {n_eval} test rows per task ({EVAL_FROM}..{EVAL_FROM + n_eval - 1}, disjoint from "
                "the query rows)", "",
                "| task | oracle (its real adapters) | top-1 | top-3 | all 12 | top-3 set |", "|---|---|---|---|---|---|"]
        for task in REAL:
            acc = {r["variant"]: r for r in comp if r["task"] == task}
            names = ", ".join(("/".join(Path(x).parts[-2:]) if Path(x).parent.name in ("r4", "r16") else Path(x).name)
                              for x in acc["top-3"]["chosen"])
            out.append(f"| {task} | {acc['oracle']['accuracy']:.3f} | {acc['top-1']['accuracy']:.3f} | "
                       f"{acc['top-3']['accuracy']:.3f} | {acc['all-12']['accuracy']:.3f} | {names} |")
        mean = {v: np.mean([r["accuracy"] for r in comp if r["variant"] == v])
                for v in ("oracle", "top-1", "top-3", "all-12")}
        out.append(f"| **mean** | {mean['oracle']:.3f} | {mean['top-1']:.3f} | {mean['top-3']:.3f} | "
                   f"{mean['all-12']:.3f} | |")
        out += ["", "Paired differences over all scored rows (accuracy points, 95 % paired bootstrap interval):", ""]
        for v in ("top-1", "top-3", "all-12"):
            d, lo, hi = paired_ci(comp, v, "oracle")
            out.append(f"- {v} − oracle: {d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        out.append("")
    return "\n".join(out)


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
