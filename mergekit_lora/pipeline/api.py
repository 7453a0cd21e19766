"""``merge()``: plan + execute in one call, the Python face of ``loramerge merge``/``cluster``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..options import MergeOptions, make_options
from ..registry import AlgorithmParams
from .execute import MergeResult, execute
from .plan import Source, plan


def merge(sources: Sequence[Source], method: str, out: str | Path | None = None, *,
          params: Mapping[str, Any] | AlgorithmParams | None = None, weights: Sequence[float] | None = None,
          options: MergeOptions | None = None, recipe: str | None = None, **option_fields: Any) -> MergeResult:
    """Merge ``sources`` with ``method``; write to ``out`` (atomically, with a model card) or keep in memory.

    Run options come from ``options`` and/or keyword fields of :class:`MergeOptions`
    (``device="cpu"``, ``force=True``, …); keywords override ``options``.

    >>> merge(["a", "b"], "linear", "merged", weights=[0.5, 0.5], dtype="bfloat16")  # doctest: +SKIP
    """
    opts = make_options(options, out=Path(out) if out is not None else (options.out if options else None),
                        **option_fields)
    return execute(plan(sources, method, params, weights, opts, recipe=recipe))
