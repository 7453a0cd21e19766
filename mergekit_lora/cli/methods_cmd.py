"""``loramerge methods``."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .common import console, user_errors


@user_errors
def methods(as_json: Annotated[bool, typer.Option("--json", help="machine-readable list")] = False) -> None:
    """List the registered merge methods with their parameters."""
    from mergekit_lora.registry import available  # the core loads when a command runs (start-up time)

    described = [entry.describe() for entry in available().values()]
    if as_json:
        typer.echo(json.dumps(described, indent=2, default=str))
        return
    if not described:
        console.print("no merge methods are registered")
        return
    t = Table(title="merge methods")
    t.add_column("method", style="bold")
    t.add_column("what it does")
    t.add_column("parameters (default)")
    for d in described:
        params = "\n".join(
            (f"{k} (required)" if v.get("required") else f"{k}={v['default']!r}") + (f"  {v['help']}" if v["help"] else "")
            for k, v in d["parameters"].items()
        )
        t.add_row(escape(d["name"]), escape(d["description"]), escape(params) or "-")  # "[a/‖a‖; b/‖b‖]" is text
    console.print(t)
