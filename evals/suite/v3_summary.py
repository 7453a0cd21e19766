"""The issue-22 verdicts from held-out ``eval compare`` reports: 2025 vs 2024 methods at their defaults.

    python evals/suite/v3_summary.py evals/results/v3-seven.json evals/results/v3-fragile.json

For each report: the best 2024-generation static merge at its defaults (linear, svd, ties, dare_linear,
dare_ties, magnitude_prune, lego), the best 2025 method at its defaults (knots_ties, knots_dare_ties,
tsv, iso_c, iso_cts, core-space ties), their paired difference of mean accuracy with a bootstrap 95 % CI
(the report's per-example outcomes, tasks resampled independently: ``evals.stats.paired_mean_diff``), the same for the tuned rows (``*``),
``cluster``/``lego`` at its defaults against the exact average, and harm beside each.  The best rows are
picked on these test numbers (that is what "the best at its defaults" means); the *defaults* themselves
were chosen on other scenarios' validation slices (select_defaults.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_lora.evals.stats import paired_mean_diff

GEN_2024 = {"linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "lego"}
GEN_2025 = {"knots_ties", "knots_dare_ties", "tsv", "iso_c", "iso_cts", "ties-core"}


def paired(a: dict[str, Any], b: dict[str, Any], tasks: list[str]) -> tuple[float, float, float]:
    """(mean acc a − b, 95 % CI low, high): :func:`evals.stats.paired_mean_diff`, 2,000 resamples."""
    p = paired_mean_diff(a, b, tasks, resamples=2000)
    assert p is not None, f"{a['variant']} / {b['variant']}: no per-example outcomes"
    return p["diff"], p["ci"][0], p["ci"][1]


def harm(row: dict[str, Any], base: dict[str, Any]) -> str:
    h, b = row.get("harm") or {}, base.get("harm") or {}
    parts = []
    if h.get("ppl") and b.get("ppl"):
        parts.append(f"ppl ×{h['ppl'] / b['ppl']:.2f}")
    common = [t for t in h.get("unseen", {}) if t in b.get("unseen", {})]
    if common:
        parts.append(f"unseen {100 * np.mean([h['unseen'][t] - b['unseen'][t] for t in common]):+.1f}")
    return ", ".join(parts) or "–"


def summarize(path: Path) -> list[str]:
    rep = json.loads(path.read_text())
    tasks = rep["tasks"]
    rows = [r for r in rep["rows"] if "mean_accuracy" in r]
    by = {r["variant"]: r for r in rows}
    base = next(r for r in rep["rows"] if r.get("kind") == "base")
    merges = [r for r in rows if r.get("kind") == "merge"]

    def label(r: dict[str, Any]) -> str:
        return r["variant"] + ("*" if r.get("tuned") else "")

    def best(names: set[str], tuned: bool) -> dict[str, Any] | None:
        pool = [r for r in merges if bool(r.get("tuned")) == tuned
                and (r["variant"].removesuffix("-tuned") in names or (r["method"] in names and not tuned
                                                                     and r["variant"] == r["method"]))]
        return max(pool, key=lambda r: r["mean_accuracy"], default=None)

    out = [f"### {path.stem}", "", f"Tasks: {', '.join(tasks)}; base mean accuracy {base_mean(base, tasks):.3f}.", "",
           "| comparison | rows | Δ mean accuracy [95 % CI] (points) | norm. acc of the first | harm of the first |",
           "|---|---|---|---|---|"]
    for what, tuned in (("defaults", False), ("strength tuned on validation", True)):
        new, old = best(GEN_2025, tuned), best(GEN_2024, tuned)
        if new and old:
            d, lo, hi = paired(new, old, tasks)
            out.append(f"| best 2025 vs best 2024, {what} | {label(new)} vs {label(old)} | "
                       f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                       f"{new.get('normalized_accuracy', float('nan')):.3f} | {harm(new, base)} |")
    if "lego" in by and "linear" in by:
        d, lo, hi = paired(by["lego"], by["linear"], tasks)
        out.append(f"| cluster (lego) at its defaults vs the exact average | lego vs linear | "
                   f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                   f"{by['lego'].get('normalized_accuracy', float('nan')):.3f} | {harm(by['lego'], base)} |")
    out += ["", "| row | mean acc | norm. acc | Δ vs exact average [95 % CI] | harm |", "|---|---|---|---|---|"]
    for r in sorted(merges, key=lambda r: -r["mean_accuracy"]):
        if r["variant"] == "linear":
            cell = "(reference)"
        elif "linear" in by:
            d, lo, hi = paired(r, by["linear"], tasks)
            cell = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        else:
            cell = "–"
        out.append(f"| {label(r)} | {r['mean_accuracy']:.3f} | {r.get('normalized_accuracy', float('nan')):.3f} | "
                   f"{cell} | {harm(r, base)} |")
    return out


def base_mean(base: dict[str, Any], tasks: list[str]) -> float:
    return float(np.mean([base["tasks"][t]["accuracy"] for t in tasks]))


def main() -> None:
    for p in sys.argv[1:]:
        print("\n".join(summarize(Path(p))) + "\n")


if __name__ == "__main__":
    main()
