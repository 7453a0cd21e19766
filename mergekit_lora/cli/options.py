"""CLI flags generated from :class:`~mergekit_lora.options.MergeOptions`: one definition, one help text.

``@with_options("seed", "device", …)`` adds a typer option for each named field to a command and hands
the command one validated ``options: MergeOptions``.  ``flag(field)`` is the only place where a field
name becomes a command-line flag (``output_format`` -> ``--format``); errors from the core name
fields as ``«field»`` and are rendered here with these flags.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_origin

import typer

from mergekit_lora.options import MergeOptions, make_options

F = TypeVar("F", bound=Callable[..., Any])

_FLAGS = {"output_format": "--format", "calibrate_data": "--calibrate", "lambda_": "--lambda", "profiles": "--profile-data"}
_SHORT = {"out": "-o"}


def flag(field: str) -> str:
    """The flag of a field name: ``--`` plus the name with dashes, except where a flag reads better."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def with_options(*fields: str) -> Callable[[F], F]:
    """Add the typer options of these MergeOptions fields; the command gets ``options`` (other fields default)."""
    unknown = [f for f in fields if f not in MergeOptions.model_fields]
    if unknown:
        raise ValueError(f"not MergeOptions fields: {unknown}")

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "options"]
        added = []
        for name in fields:
            info = MergeOptions.model_fields[name]
            names = [flag(name)] if name in _FLAGS else []  # else typer names it (bools get --x/--no-x)
            opt = typer.Option(*names, *([_SHORT[name]] if name in _SHORT else []), help=info.description)
            # choices are checked by MergeOptions (one `error:` line naming the flag), not by click
            annotation = str if get_origin(info.annotation) is Literal else info.annotation
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info.default,
                                           annotation=Annotated[annotation, opt]))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in fields}
            return fn(*args, options=make_options(**values), **kwargs)

        new = sig.replace(parameters=own + added)
        wrapper.__signature__ = new  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in new.parameters.values()}
        del wrapper.__wrapped__  # typer must read the new signature, not the wrapped function's
        return wrapper  # type: ignore[return-value]

    return decorate


# Options every command that writes an adapter shares.
WRITE_OPTIONS = ("seed", "scale", "missing", "device", "dtype", "output_format", "profile", "base_gguf", "force",
                 "allow_pickle", "ignore_modules_to_save", "threads", "verify_inputs")

EmitRecipeOpt = Annotated[str | None, typer.Option(help="also write the equivalent recipe YAML here ('-' prints it)")]
