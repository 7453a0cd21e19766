"""Method parameters in recipes: layer gradients and validation by the method's own Params model.

A gradient (as in mergekit) is a list of values spread evenly over the relative layer index
t ∈ [0, 1] and linearly interpolated between them: ``[1.0, 0.5]`` goes from 1.0 at the first layer
to 0.5 at the last.  When every anchor is an integer the interpolated value is rounded half up (so
integer parameters such as ``rank`` stay integers).  Modules without a layer index use t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from ..errors import not_finite
from ..registry import field_names, user_names
from .yaml_lines import format_loc

if TYPE_CHECKING:
    from ..registry import Algorithm
    from .problems import Problems
    from .yaml_lines import Loc


def is_gradient(value: Any) -> bool:
    return (isinstance(value, list) and len(value) >= 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value))


def at(value: Any, t: float) -> Any:
    """``value`` at relative layer position ``t`` (scalars are constant)."""
    if not is_gradient(value):
        return value
    n = len(value)
    pos = min(max(t, 0.0), 1.0) * (n - 1)
    i = min(int(math.floor(pos)), n - 2)
    frac = pos - i
    v = value[i] * (1.0 - frac) + value[i + 1] * frac
    if all(isinstance(x, int) for x in value):
        return int(math.floor(v + 0.5))
    return v


def anchors(values: Iterable[Any]) -> list[float]:
    """The t positions where some gradient has an anchor (t = 0 when there is none)."""
    ts = {0.0}
    for v in values:
        if is_gradient(v):
            ts.update(j / (len(v) - 1) for j in range(len(v)))
    return sorted(ts)


def _literal_list_ok(algo: Algorithm, field: str, value: Any) -> bool:
    """A list the field itself accepts (a list-typed parameter) is a value, not a gradient."""
    info = algo.Params.model_fields[field]
    try:
        TypeAdapter(info.annotation).validate_python(value)
        return True
    except ValidationError:
        return False


def gradient_fields(algo: Algorithm, params: dict[str, Any]) -> dict[str, Any]:
    """Mark list values of scalar parameters as gradients; list-typed parameters stay lists."""
    fields = algo.Params.model_fields
    params = field_names(algo, params)
    return {k: (v if k in fields and is_gradient(v) and not _literal_list_ok(algo, k, v) else _Literal(v))
            for k, v in params.items()}


class _Literal:
    """A parameter value that is not a gradient (wrapped so ``at`` leaves it alone)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def evaluate(params: dict[str, Any], t: float) -> dict[str, Any]:
    """Concrete parameter values at ``t`` from :func:`gradient_fields` output (None values dropped)."""
    out = {}
    for k, v in params.items():
        val = v.value if isinstance(v, _Literal) else at(v, t)
        if val is not None:
            out[k] = val
    return out


def check_parameters(algo: Algorithm, base: dict[str, Any], values: dict[str, Any], loc: Loc,
                     problems: Problems) -> None:
    """Validate ``values`` (layered on ``base``) with ``algo.Params`` at every gradient anchor."""
    fields = algo.Params.model_fields
    given = values
    base, values = field_names(algo, base), field_names(algo, values)
    for k, k_given in zip(values, given):
        if k not in fields:
            takes = f"it takes: {', '.join(user_names(algo))}" if fields else "it takes no parameters"
            problems.add(loc + (k_given,), f"method {algo.name!r} does not take {k_given!r}; {takes}")
    known = {k: v for k, v in {**base, **values}.items() if k in fields}
    marked = gradient_fields(algo, known)
    grads = [v for v in marked.values() if not isinstance(v, _Literal)]
    for t in anchors(grads):
        try:
            algo.Params(**evaluate(marked, t))
        except ValidationError as e:
            for err in e.errors():
                _report(algo, err, values, marked, t, loc, problems)


def _report(algo: Algorithm, err: dict[str, Any], values: dict[str, Any], marked: dict[str, Any], t: float,
            loc: Loc, problems: Problems) -> None:
    field = err["loc"][0] if err["loc"] else None
    if field is None:
        problems.add(loc, err["msg"].removeprefix("Value error, "))
        return
    if err["type"] == "missing":
        if not values or loc[:1] == ("parameters",):
            problems.add(loc, f"method {algo.name!r} needs the parameter {field!r}")
        return
    if field not in values:
        return  # reported where it was set (the recipe's top-level parameters)
    where: Loc = loc + (field,)
    v = marked.get(field)
    if err["type"] == "finite_number":  # NaN/Inf: one wording, whatever validator meets it first
        problems.add(where, not_finite(format_loc(where)))
        return
    msg = err["msg"].removeprefix("Value error, ")
    if v is not None and not isinstance(v, _Literal):
        n = len(v)
        j = round(t * (n - 1))
        if abs(j / (n - 1) - t) < 1e-12:
            where = where + (j,)
        else:
            msg += f" at layer position {t:g} (interpolated)"
    got = err.get("input")
    if isinstance(got, (str, int, float, bool)) or got is None:
        msg += f" (got {got!r})"
    problems.add(where, msg)
