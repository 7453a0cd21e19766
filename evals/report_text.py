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
