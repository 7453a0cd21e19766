"""The retrieval evaluation's scoring and report: precision@1 / recall@m per configuration, the choice on
validation queries, the compose table with paired intervals.  Used by ``retrieval_eval.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from library_set import (  # the script's folder is on sys.path
    DISTRACTORS,
    DRAWS,
    EVAL_FROM,
    REAL,
    RERANK_SIZES,
    SHORTLISTS,
    SIGNATURE_DRAWS,
    SIZES,
    STATISTICS,
    SUITE,
    VAL_DRAWS,
    VAL_K,
)

from mergekit_lora.evals.stats import paired_mean_diff
from mergekit_lora.library import dedupe
from mergekit_lora.library.store import Library


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


def paired_ci(comp: list[dict], a: str, b: str) -> tuple[float, float, float]:
    """(mean over the tasks of a − b, 95 % paired bootstrap interval) in accuracy points: the project's
    paired bootstrap (``stats.paired_mean_diff``, each task's examples resampled, the same draws for both)."""
    rows = {v: {"variant": v, "tasks": {r["task"]: {"correct": r["correct"]} for r in comp if r["variant"] == v}}
            for v in (a, b)}
    res = paired_mean_diff(rows[a], rows[b], list(REAL), resamples=2000)
    assert res is not None
    return 100 * res["diff"], 100 * res["ci"][0], 100 * res["ci"][1]


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
        out += ["", "Paired differences of the mean over the tasks (accuracy points, 95 % paired bootstrap interval, each task's rows resampled: stats.paired_mean_diff):", ""]
        for v in ("top-1", "top-3", "all-12"):
            d, lo, hi = paired_ci(comp, v, "oracle")
            out.append(f"- {v} − oracle: {d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
        out.append("")
    return "\n".join(out)
