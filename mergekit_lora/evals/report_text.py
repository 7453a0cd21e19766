"""Text pieces shared by the markdown and HTML reports: variant names, CIs, paired differences."""

from __future__ import annotations

from typing import Any


def number(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def variant_name(r: dict[str, Any]) -> str:
    """The row's label; tuned rows (best of a grid on the validation slice) carry a ``*``."""
    return r["variant"] + ("*" if r.get("tuned") else "")


def ci_text(r: dict[str, Any]) -> str:
    ci = r.get("norm_ci")
    return "–" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def paired_text(r: dict[str, Any], key: str = "paired", *, named: bool = False) -> str:
    """``+0.012 [-0.003, +0.027]`` (``named``: prefixed by the row compared against) or ``–``."""
    p = r.get(key)
    if not p:
        return "–"
    return (f"{p['vs']}: " if named else "") + f"{p['diff']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"


def console_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The terminal's table: what fits 80 columns (variant, normalised accuracy with its CI, Δ to the best
    static merge, rank); per-task accuracies, fidelity and timings are in report.md/.html."""
    head = ["variant", "norm. acc", "95% CI", "Δ vs best static [CI]", "rank"]
    rows = []
    for r in report["rows"]:
        if "error" in r:
            rows.append([variant_name(r), "–", "–", f"failed: {str(r['error'])[:24]}", "–"])
            continue
        rows.append([variant_name(r), number(r.get("normalized_accuracy")), ci_text(r), paired_text(r),
                     str(r.get("rank") or "–")])
    return head, rows


def verdict(report: dict[str, Any]) -> str:
    """One line: the merge with the best normalised accuracy and its paired Δ (95% CI) to the best static merge."""
    merges = [r for r in report["rows"] if r.get("kind") == "merge" and r.get("normalized_accuracy") is not None]
    if not merges:
        return "verdict: no merge was scored"
    merges.sort(key=lambda r: r["normalized_accuracy"], reverse=True)
    best = merges[0]
    head = f"verdict: {variant_name(best)} is the best merge (norm. acc {best['normalized_accuracy']:.3f})"
    p = best.get("paired")
    if p:
        lo, hi = p["ci"]
        sure = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
        return f"{head}: Δ {p['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] vs {p['vs']}, paired 95% CI {sure}"
    runner = next((r for r in merges[1:] if r.get("paired")), None)
    if runner is None:
        return f"{head}, the best static merge"
    q = runner["paired"]
    return (f"{head}, the best static merge; next {variant_name(runner)}: Δ {q['diff']:+.3f} "
            f"[{q['ci'][0]:+.3f}, {q['ci'][1]:+.3f}]")


def mean_text(r: dict[str, Any]) -> str:
    """The paired difference of mean accuracy to the reference row, in points: ``+2.6 [+1.1, +4.0]``."""
    p = r.get("paired_mean")
    if not p:
        return "–"
    return f"{100 * p['diff']:+.1f} [{100 * p['ci'][0]:+.1f}, {100 * p['ci'][1]:+.1f}]"


def harm_text(h: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """[perplexity on generic text as a ratio to the base's, mean accuracy change on unseen tasks in points]."""
    ppl = f"{h['ppl'] / base['ppl']:.3f}" if h.get("ppl") and base.get("ppl") else "–"
    un, bu = h.get("unseen") or {}, base.get("unseen") or {}
    common = [t for t in un if t in bu]
    delta = f"{100 * sum(un[t] - bu[t] for t in common) / len(common):+.1f}" if common else "–"
    return [ppl, delta]
