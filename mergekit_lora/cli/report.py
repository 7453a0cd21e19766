"""Small rich renderings shared by commands."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .common import console


def print_fidelity(summary: dict[str, dict[str, float]], to: Console = console) -> None:
    if not summary:
        return
    t = Table(title="fidelity vs Σ wᵢ ΔWᵢ", title_justify="left")
    t.add_column("module group")
    t.add_column("modules", justify="right")
    t.add_column("rel. error", justify="right")
    t.add_column("energy ratio", justify="right")
    for g, v in summary.items():
        style = "bold" if g == "overall" else ""
        t.add_row(g, str(v["modules"]), f"{v['rel_error']:.3e}", f"{v['energy_ratio']:.4f}", style=style)
    to.print(t)
