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
