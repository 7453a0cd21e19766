"""Shared CLI plumbing: one error line and exit code 2 for user errors, a shared console."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mergekit_lora.errors import LoraMergeError

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
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_floats(text: str | None, what: str = "weights") -> list[float] | None:
    """``"1,0.5"`` -> [1.0, 0.5]; a clear error for anything else."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LoraMergeError(f"--{what} must be comma-separated numbers like 1,0.5 (got {text!r})") from None


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """``-p key=value`` pairs; values parsed as YAML scalars (numbers, booleans, strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LoraMergeError(f"--param takes key=value (got {item!r})")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


# Options shared by the commands that write an adapter (one definition, one help text).
SeedOpt = Annotated[int, typer.Option(help="seed for everything random")]
MissingOpt = Annotated[str, typer.Option(help="modules missing from some inputs: union|intersection|error")]
DeviceOpt = Annotated[str, typer.Option(help="auto|cpu|cuda")]
DtypeOpt = Annotated[str | None, typer.Option(help="output dtype (default: the inputs')")]
FormatOpt = Annotated[str | None, typer.Option("--format", help="output format (default: the inputs')")]
ForceOpt = Annotated[bool, typer.Option(help="replace an existing output")]
AllowPickleOpt = Annotated[bool, typer.Option(help="read .bin/.pt pickle files (only if you trust them)")]
EmitRecipeOpt = Annotated[str | None, typer.Option(help="also write the equivalent recipe YAML here ('-' prints it)")]
