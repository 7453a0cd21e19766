"""Shared CLI plumbing: one error line and exit code 2 for user errors, consoles, small parsers."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mergekit_lora.errors import LoraMergeError

from .options import flag

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn :class:`LoraMergeError` into ``error: <message>`` on stderr and exit code 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoraMergeError as e:
            err_console.print(f"[bold red]error:[/] {escape(e.render(flag))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_floats(text: str | None, what: str = "weights") -> list[float] | None:
    """``"1,0.5"`` -> [1.0, 0.5]; a clear error for anything else."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LoraMergeError(f"--{what} must be comma-separated numbers like 1,0.5 (got {text!r})") from None
    if not all(math.isfinite(v) for v in values):  # torch-free until there is something to report
        from mergekit_lora.checks import finite_numbers

        finite_numbers(f"--{what}", values)  # issue 14: before the recipe YAML is built from them
    return values


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """``-p key=value`` pairs; values parsed as YAML (numbers, booleans, strings, lists) by the recipes'
    safe loader: a malformed value or a refused tag is one error naming the pair (issue 28)."""
    from mergekit_lora.recipe.yaml_lines import load_yaml_with_lines

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LoraMergeError(f"--param takes key=value (got {item!r})")
        k, v = item.split("=", 1)
        try:
            value = load_yaml_with_lines(v, "value")[0]
        except LoraMergeError as e:
            why = str(e).removeprefix("value: ").replace("YAML (line 1, column", "YAML (column")
            raise LoraMergeError(f"-p {item}: the value is {why}; quote it, or write a number, true/false, a word "
                                 "or a list like [1, 2]") from None
        out[k.strip().replace("-", "_")] = value
    return out


def emit(recipe: str, dest: str | None) -> None:
    """``--emit-recipe``: '-' prints the recipe, a path gets it written (before the merge starts)."""
    if dest is None:
        return
    if dest == "-":
        typer.echo(recipe, nl=False)
        return
    try:
        Path(dest).write_text(recipe)
    except OSError as e:
        raise LoraMergeError(f"--emit-recipe {dest}: cannot write the recipe ({e.strerror})") from None
