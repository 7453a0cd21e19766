"""Bootstrap confidence intervals and paired comparisons over the same test examples.

Every variant of a comparison is scored on the *same* examples, with the per-example outcome kept
(``tasks[t]["correct"]``: 0/1 per example, task order).  One bootstrap resample draws, for each task
independently, ``n_t`` example indices with replacement; every statistic of that resample is computed
on those indices for every variant at once, so differences between variants are *paired*.

Normalised accuracy of a variant = mean over tasks of acc(variant, t) / acc(own adapter of t, t); in a
resample both accuracies are recomputed on the resampled examples (the reference is noisy too).
Intervals are percentile intervals (2.5 %, 97.5 %).
"""

from __future__ import annotations

from typing import Any

import numpy as np

STATIC_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def outcome_array(correct: str | list[int]) -> np.ndarray:
    """Per-example outcomes as float64 [n]: from a ``"0110…"`` string (report JSON) or a 0/1 list."""
    if isinstance(correct, str):
        return (np.frombuffer(correct.encode("ascii"), dtype=np.uint8) - ord("0")).astype(np.float64)
    return np.asarray(correct, dtype=np.float64)


def resample_indices(n_per_task: dict[str, int], resamples: int, seed: int) -> dict[str, np.ndarray]:
    """{task: int array [resamples, n_t]} of example indices drawn with replacement (fixed seed)."""
    rng = np.random.default_rng(seed)
    return {t: rng.integers(0, n, size=(resamples, n)) for t, n in sorted(n_per_task.items())}


def normalized_samples(correct: dict[str, np.ndarray], own: dict[str, np.ndarray],
                       idx: dict[str, np.ndarray]) -> np.ndarray:
    """Bootstrap samples [resamples] of normalised accuracy.

    correct: {task: [n_t] 0/1 of the variant}; own: {task: [n_t] 0/1 of the task's own adapter};
    idx: {task: [resamples, n_t]} from :func:`resample_indices`.
    """
    ratios = []
    for t, c in correct.items():
        acc = c[idx[t]].mean(1)
        ref = own[t][idx[t]].mean(1)
        ratios.append(np.divide(acc, ref, out=np.full_like(acc, np.nan), where=ref > 0))
    return np.nanmean(np.stack(ratios), axis=0) if ratios else np.zeros(0)


def interval(samples: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval [lo, hi] of bootstrap samples."""
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def best_static(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The merge row of a static method (linear/cat/svd/ties/dare/magnitude-prune) with the highest
    normalised accuracy, tuned rows included (they were tuned on the validation slice, not the test)."""
    cands = [r for r in rows if r.get("kind") == "merge" and r.get("method") in STATIC_METHODS
             and r.get("normalized_accuracy") is not None]
    return max(cands, key=lambda r: r["normalized_accuracy"], default=None)


def add_intervals(rows: list[dict[str, Any]], tasks: list[str], own: dict[str, str], *,
                  resamples: int = 1000, seed: int = 0) -> None:
    """Add ``norm_ci`` to every row with a normalised accuracy, ``paired`` (difference to the best
    static baseline: point value, interval, share of resamples where the row is better) to every other
    row, and ``paired_rank`` to merge rows (the same against the best static merge of equal output
    rank, the comparison LoRA-LEGO's claims are about); in place.  Nothing is added without per-example outcomes or without ``resamples``."""
    if resamples <= 0 or not own or set(own) != set(tasks):
        return
    by_name = {r["variant"]: r for r in rows}

    def outcomes(row: dict[str, Any]) -> dict[str, np.ndarray] | None:
        try:
            return {t: outcome_array(row["tasks"][t]["correct"]) for t in tasks}
        except KeyError:
            return None

    try:  # the own adapter of each task, on that task (it may have been scored on its own task only)
        own_correct = {t: outcome_array(by_name[own[t]]["tasks"][t]["correct"]) for t in tasks}
    except KeyError:
        return
    if any(len(c) == 0 for c in own_correct.values()):
        return
    idx = resample_indices({t: len(own_correct[t]) for t in tasks}, resamples, seed)
    samples: dict[str, np.ndarray] = {}
    for r in rows:
        c = outcomes(r) if r.get("normalized_accuracy") is not None else None
        if c is None or any(len(c[t]) != len(own_correct[t]) for t in tasks):
            continue
        samples[r["variant"]] = normalized_samples(c, own_correct, idx)
        r["norm_ci"] = interval(samples[r["variant"]])
    def paired(r: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
        diff = samples[r["variant"]] - samples[ref["variant"]]
        return {"vs": ref["variant"], "diff": r["normalized_accuracy"] - ref["normalized_accuracy"],
                "ci": interval(diff), "p_better": float(np.mean(diff > 0))}

    scored = [r for r in rows if r["variant"] in samples]
    best = best_static(scored)
    for r in scored:
        if best is not None and r is not best:
            r["paired"] = paired(r, best)
        if r.get("kind") == "merge" and r.get("rank"):  # against the best static merge of the same rank
            same = best_static([q for q in scored if q is not r and q.get("rank") == r["rank"]])
            if same is not None:
                r["paired_rank"] = paired(r, same)


def paired_mean_diff(a: dict[str, Any], b: dict[str, Any], tasks: list[str], *, resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any] | None:
    """Mean accuracy of row ``a`` minus row ``b`` over ``tasks`` (accuracy units) with a paired percentile
    interval: each resample draws every task's examples independently (:func:`resample_indices`), the same
    draws for both rows.  None when a row lacks per-example outcomes for a task or the counts differ."""
    try:
        ca = {t: outcome_array(a["tasks"][t]["correct"]) for t in tasks}
        cb = {t: outcome_array(b["tasks"][t]["correct"]) for t in tasks}
    except KeyError:
        return None
    if any(len(ca[t]) != len(cb[t]) or len(ca[t]) == 0 for t in tasks):
        return None
    idx = resample_indices({t: len(c) for t, c in cb.items()}, resamples, seed + 1)
    diff = np.mean(np.stack([ca[t][idx[t]].mean(1) - cb[t][idx[t]].mean(1) for t in tasks]), axis=0)
    point = float(np.mean([ca[t].mean() - cb[t].mean() for t in tasks]))
    return {"vs": b["variant"], "diff": point, "ci": interval(diff)}


def add_paired_mean(rows: list[dict[str, Any]], tasks: list[str], reference: str, *, resamples: int = 1000,
                    seed: int = 0) -> None:
    """Add ``paired_mean`` (:func:`paired_mean_diff` against the ``reference`` row) to every other row scored
    on all ``tasks``; in place.  Nothing without the reference row or without ``resamples``."""
    ref = next((r for r in rows if r["variant"] == reference), None)
    if resamples <= 0 or ref is None:
        return
    for r in rows:
        if r is not ref and (p := paired_mean_diff(r, ref, tasks, resamples=resamples, seed=seed)) is not None:
            r["paired_mean"] = p
