"""The search space: per-adapter weights plus the method parameters named by ``--search``.

Bounds come from the method's ``Params`` model: ``ge``/``gt``/``le``/``lt`` of numeric fields,
``Literal`` choices, booleans.  A parameter without an upper bound gets one from ``ranges``
(``--range NAME=LO:HI``); ``rank``/``k``/``top_k`` default to 1..(summed input rank).  Weights are
bounded [-1.5, 1.5] as in LoraHub.  A candidate is ``{"weights": [...], "params": {...}}``.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.registry import Algorithm

WEIGHT_BOUND = 1.5
RANK_LIKE = ("rank", "k", "top_k")
# ``--search scale``: the strength as a multiple F of the exact average's norm (scale ``F*average``)
SCALE_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class Dim:
    """One searched parameter: ``kind`` float|int (low..high inclusive) or choice (``choices``)."""

    name: str
    kind: Literal["float", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()
    init: Any = None


@dataclass(frozen=True)
class SearchSpace:
    n_weights: int  # 0: weights fixed
    dims: tuple[Dim, ...]
    init_weights: tuple[float, ...]
    fixed_weights: tuple[float, ...]

    def names(self) -> list[str]:
        return (["weights"] if self.n_weights else []) + [d.name for d in self.dims]

    def candidate(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Optimiser values (``w0..``, param names) -> {"weights", "params"} with plain Python types."""
        w = ([float(flat[f"w{i}"]) for i in range(self.n_weights)] if self.n_weights else list(self.fixed_weights))
        params = {}
        for d in self.dims:
            v = flat[d.name]
            params[d.name] = int(round(float(v))) if d.kind == "int" else float(v) if d.kind == "float" else v
        return {"weights": w, "params": params}


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional) for ``X | None``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else annotation), True
    return annotation, False


def _bounds(field) -> tuple[float | None, float | None, bool, bool]:
    lo = hi = None
    lo_open = hi_open = False
    for m in field.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
    return lo, hi, lo_open, hi_open


def build_space(algo: Algorithm, search: Sequence[str], n_adapters: int, *, pooled_rank: int,
                ranges: dict[str, tuple[float, float]] | None = None, fixed: dict[str, Any] | None = None,
                weights: Sequence[float] | None = None) -> SearchSpace:
    """The space for ``search`` (``weights`` and/or Params field names); unknown names are one error."""
    ranges = dict(ranges or {})
    fixed = dict(fixed or {})
    fields = algo.Params.model_fields
    aliases = {f.alias: n for n, f in fields.items() if f.alias}
    names = [aliases.get(s.strip(), s.strip()) for s in search if s.strip()]
    ranges = {aliases.get(k, k): v for k, v in ranges.items()}
    if not names:
        raise LoraMergeError("search: name at least one of weights or the method's parameters")
    unknown = [n for n in names if n not in ("weights", "scale") and n not in fields]
    if unknown:
        raise LoraMergeError(f"search: method {algo.name!r} has no parameter {unknown[0]!r}; it has "
                             f"{', '.join(fields)} (and weights, scale)")
    extra = sorted(set(ranges) - set(names))
    if extra:
        raise LoraMergeError(f"range given for {extra[0]!r}, which is not searched; add it to search")
    start = [float(x) for x in (weights or [1.0 / n_adapters] * n_adapters)]
    dims = []
    for n in names:
        if n == "weights":
            continue
        if n == "scale":
            lo, hi = ranges.get("scale", SCALE_RANGE)
            dims.append(Dim("scale", "float", float(lo), float(hi), init=min(max(1.0, float(lo)), float(hi))))
            continue
        dims.append(_dim(n, fields[n], ranges.get(n), pooled_rank, fixed.get(n)))
    return SearchSpace(n_adapters if "weights" in names else 0, tuple(dims),
                       tuple(max(-WEIGHT_BOUND, min(WEIGHT_BOUND, w)) for w in start), tuple(start))


def _dim(name: str, field, given: tuple[float, float] | None, pooled_rank: int, fixed_value: Any) -> Dim:
    tp, _ = _unwrap(field.annotation)
    default = fixed_value if fixed_value is not None else field.default
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return Dim(name, "choice", choices=choices, init=default if default in choices else choices[0])
    if tp is bool:
        return Dim(name, "choice", choices=(False, True), init=bool(default) if default is not None else False)
    if tp not in (int, float):
        raise LoraMergeError(f"search: parameter {name!r} ({tp}) cannot be searched; search numbers or choices")
    lo, hi, lo_open, hi_open = _bounds(field)
    if given is not None:
        lo, hi, lo_open, hi_open = given[0], given[1], False, False
    elif hi is None and name in RANK_LIKE and tp is int:
        hi = pooled_rank
    if lo is None or hi is None:
        raise LoraMergeError(f"search: parameter {name!r} has no {'upper' if hi is None else 'lower'} bound; "
                             f"give one with range {name}=LO:HI")
    if tp is int:
        low, high = int(math.ceil(lo + (1 if lo_open and lo == int(lo) else 0))), int(math.floor(hi - (1 if hi_open and hi == int(hi) else 0)))
    else:
        span = float(hi) - float(lo)
        low, high = float(lo) + (1e-3 * span if lo_open else 0.0), float(hi) - (1e-3 * span if hi_open else 0.0)
    if not low < high:
        raise LoraMergeError(f"search: parameter {name!r} has an empty range {low}..{high}")
    init = default if isinstance(default, int | float) and not isinstance(default, bool) else (low + high) / 2
    init = min(max(init, low), high)
    return Dim(name, "int" if tp is int else "float", low, high, init=int(round(init)) if tp is int else float(init))


def parse_ranges(items: Sequence[str] | None) -> dict[str, tuple[float, float]]:
    """``["k=2:16", "density=0.1:0.9"]`` -> {name: (lo, hi)}."""
    out = {}
    for item in items or []:
        try:
            name, span = item.split("=", 1)
            lo, hi = (float(x) for x in span.split(":"))
        except ValueError:
            raise LoraMergeError(f"--range takes NAME=LO:HI (got {item!r})") from None
        out[name.strip().replace("-", "_")] = (lo, hi)
    return out


def split_scale(params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(the method's parameters, the strength option) of a candidate: a searched ``scale`` F is the
    option ``F*average``; None when the strength is not searched."""
    if "scale" not in params:
        return params, None
    rest = {k: v for k, v in params.items() if k != "scale"}
    return rest, f"{float(params['scale']):.6g}*average"
