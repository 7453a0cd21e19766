"""``loramerge inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import console, user_errors


def _fmt(summary: dict[str, Any]) -> str:
    if "uniform" in summary:
        return f"{summary['uniform']:g}" if isinstance(summary["uniform"], float) else str(summary["uniform"])
    counts = ", ".join(f"{k}: {v}" for k, v in summary["counts"].items())
    return f"{summary['min']:g}–{summary['max']:g} ({counts})"


@user_errors
def inspect(
    paths: Annotated[list[Path], typer.Argument(help="adapter folders or .safetensors files")],
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON report instead of tables")] = False,
    modules: Annotated[bool, typer.Option("--modules", help="list every module, not only groups")] = False,
) -> None:
    """Show what an adapter holds: format, base model, ranks, scales, sizes, ‖ΔW‖ per module group."""
    from mergekit_lora.inspect import inspect_adapter  # the core loads when a command runs (start-up time)

    reports = [inspect_adapter(p) for p in paths]
    if as_json:
        for r in reports:
            if not modules:
                r.pop("per_module")
        typer.echo(json.dumps(reports if len(reports) > 1 else reports[0], indent=2, default=str))
        return
    for r in reports:
        head = Table.grid(padding=(0, 2))
        head.add_column(style="bold cyan")
        head.add_column()
        head.add_row("adapter", r["path"])
        head.add_row("format", r["format"] + (f" ({r['base_family']})" if r.get("base_family") else ""))
        head.add_row("base model", str(r["base_model"] or "not recorded"))
        head.add_row("modules", str(r["modules"]))
        head.add_row("rank", _fmt(r["rank"]))
        alpha = _fmt(r["alpha"]) + ("  (assumed = rank: no adapter_config.json; state it as FILE:alpha=N)"
                                        if r["alpha_assumed"] else "")
        head.add_row("alpha", alpha)
        head.add_row("scale", _fmt(r["scale"]) + ("  (rsLoRA: alpha/√r)" if r["use_rslora"] else ""))
        head.add_row("dtype", r["dtype"])
        head.add_row("parameters", f"{r['parameters']:,}")
        for key in ("routing", "sd"):
            if key in r:
                head.add_row(key, ", ".join(f"{k}={v}" for k, v in r[key].items() if not isinstance(v, (dict, list))))
        if r["unknown_keys"]:
            shown = ", ".join(r["unknown_keys"][:5]) + (" …" if len(r["unknown_keys"]) > 5 else "")
            head.add_row("[yellow]unknown keys", f"[yellow]{len(r['unknown_keys'])}: {shown}")
        if r["dropped_modules_to_save"]:
            head.add_row("[yellow]modules_to_save", f"[yellow]{len(r['dropped_modules_to_save'])} full tensors (not LoRA)")
        if r["dropped_base_layers"]:
            head.add_row("base layers", f"{len(r['dropped_base_layers'])} saved base weights ignored (not ΔW)")
        for w in r.get("serving_warnings", []):
            head.add_row("[yellow]serving", f"[yellow]{w}")
        console.print(head)
        t = Table(title="module groups", title_justify="left")
        for c in ("group", "modules", "rank", "weight shape", "‖ΔW‖"):
            t.add_column(c, justify="left" if c == "group" else "right")
        for g, v in r["groups"].items():
            t.add_row(g, str(v["modules"]), _fmt(v["rank"]), "×".join(map(str, v["weight_shape"])),
                      f"{v.get('delta_norm', float('nan')):.4g}")
        console.print(t)
        if modules:
            mt = Table(title="modules", title_justify="left")
            for c in ("module", "rank", "alpha", "scale", "‖ΔW‖"):
                mt.add_column(c, justify="left" if c == "module" else "right")
            for m in r["per_module"]:
                mt.add_row(m["name"], str(m["rank"]), f"{m['alpha']:g}", f"{m['scale']:.4g}",
                           f"{m.get('delta_norm', float('nan')):.4g}")
            console.print(mt)
        console.print()
