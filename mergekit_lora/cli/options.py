"""CLI flags generated from pydantic models: one definition, one help text.

``@with_options("seed", "device", …)`` adds a typer option for each named field of
:class:`~mergekit_lora.options.MergeOptions` to a command and hands the command one validated
``options: MergeOptions``; ``@with_params(LegoParams)`` adds one for every field of a method's ``Params``
(unset by default, so the method's own defaults apply) and hands it ``params``: the fields given.
``flag(field)`` is the only place where a field name becomes a command-line flag (``output_format`` ->
``--format``); errors from the core name fields as ``«field»`` and are rendered here with these flags.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions, make_options

F = TypeVar("F", bound=Callable[..., Any])

_FLAGS = {"output_format": "--format", "calibrate_data": "--calibrate", "lambda_": "--lambda", "profiles": "--profile-data",
          "top_k_pattern": "--top-k-module", "k": "--k"}
_SHORT = {"out": "-o", "k": "-k"}


def flag(field: str) -> str:
    """The flag of a field name: ``--`` plus the name with dashes, except where a flag reads better."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _cli_type(annotation: Any) -> tuple[Any, bool]:
    """(the type click parses, whether the field is a mapping given as repeated KEY=VALUE flags).

    Choices (``Literal``) are parsed as text and checked by the model (one ``error:`` line naming the flag),
    not by click; ``X | None`` is X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    if get_origin(annotation) is Literal:
        return str, False
    if get_origin(annotation) is dict:
        return list[str], True
    return annotation, False


def _add_flags(fn: F, fields: dict[str, Any], defaults: dict[str, Any], build: Callable[[dict[str, Any]], Any],
               target: str) -> F:
    """``fn`` with a keyword-only typer option per field (pydantic FieldInfo); ``build(values)`` becomes ``target``."""
    sig = inspect.signature(fn, eval_str=True)
    own = [p for p in sig.parameters.values() if p.name != target]
    added = []
    for name, info in fields.items():
        names = [flag(name)] if name in _FLAGS else []  # else typer names it (bools get --x/--no-x)
        kind, mapping = _cli_type(info.annotation)
        if defaults[name] is None:
            kind = kind | None
        help_text = info.description + (" (repeatable)" if mapping else "")
        opt = typer.Option(*([_SHORT[name]] if name in _SHORT else []), *names, help=help_text,
                           metavar="KEY=VALUE" if mapping else None)
        added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                                       annotation=Annotated[kind, opt]))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in fields}
        return fn(*args, **{target: build(values)}, **kwargs)

    new = sig.replace(parameters=own + added)
    wrapper.__signature__ = new  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in new.parameters.values()}
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped function's
    return wrapper  # type: ignore[return-value]


def with_options(*fields: str) -> Callable[[F], F]:
    """Add the typer options of these MergeOptions fields; the command gets ``options`` (other fields default)."""
    unknown = [f for f in fields if f not in MergeOptions.model_fields]
    if unknown:
        raise ValueError(f"not MergeOptions fields: {unknown}")
    infos = {name: MergeOptions.model_fields[name] for name in fields}

    def decorate(fn: F) -> F:
        return _add_flags(fn, infos, {n: i.default for n, i in infos.items()}, lambda v: make_options(**v), "options")

    return decorate


def key_values(field: str, items: list[str]) -> dict[str, str]:
    """Repeated ``KEY=VALUE`` flags as a mapping (the values are the model's to check)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip():
            raise LoraMergeError(f"{flag(field)} takes KEY=VALUE, e.g. q_proj=2 (got {item!r})")
        out[key.strip()] = value.strip()
    return out


def with_params(model: type[BaseModel]) -> Callable[[F], F]:
    """Add a flag for every field of a method's ``Params``, unset by default (the method's own defaults apply);
    the command gets ``params``: the fields given (mappings from repeated KEY=VALUE flags), unchecked — ``plan``
    checks them with the model, once."""
    infos = dict(model.model_fields)

    def build(values: dict[str, Any]) -> dict[str, Any]:
        return {name: key_values(name, v) if _cli_type(infos[name].annotation)[1] else v
                for name, v in values.items() if v is not None}

    def decorate(fn: F) -> F:
        return _add_flags(fn, infos, dict.fromkeys(infos), build, "params")

    return decorate


# Options every command that writes an adapter shares.
WRITE_OPTIONS = ("seed", "scale", "missing", "device", "dtype", "output_format", "profile", "base_gguf", "force",
                 "allow_pickle", "ignore_modules_to_save", "threads", "verify_inputs")

EmitRecipeOpt = Annotated[str | None, typer.Option(help="also write the equivalent recipe YAML here ('-' prints it)")]
