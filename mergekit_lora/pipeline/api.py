"""``merge()``: plan + execute in one call, the Python face of ``loramerge merge``/``cluster``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..options import MergeOptions, make_options
from ..registry import AlgorithmParams
from ..request import MergeRequest
from .execute import MergeResult, execute
from .plan import Source, plan


def merge(sources: Sequence[Source] | MergeRequest, method: str | None = None, out: str | Path | None = None, *,
          params: Mapping[str, Any] | AlgorithmParams | None = None, weights: Sequence[float] | None = None,
          options: MergeOptions | None = None, recipe: str | None = None, **option_fields: Any) -> MergeResult:
    """Merge ``sources`` with ``method``; write to ``out`` (atomically, with a model card) or keep in memory.

    Run options come from ``options`` and/or keyword fields of :class:`MergeOptions`
    (``device="cpu"``, ``force=True``, …); keywords override ``options``.  A whole
    :class:`~mergekit_lora.request.MergeRequest` may be given instead (``merge(request)``).

    >>> merge(["a", "b"], "linear", "merged", weights=[0.5, 0.5], dtype="bfloat16")  # doctest: +SKIP
    """
    if isinstance(sources, MergeRequest):
        if method is not None or out is not None or params is not None or weights is not None or options is not None \
                or recipe is not None or option_fields:
            raise TypeError("merge(request) takes the request alone; change it with request.replace/with_options")
        return execute(plan(sources))
    if method is None:
        raise TypeError("merge() needs a method (or a MergeRequest)")
    opts = make_options(options, out=Path(out) if out is not None else (options.out if options else None),
                        **option_fields)
    return execute(plan(MergeRequest(sources=list(sources), method=method, params=params,
                                     weights=list(weights) if weights is not None else None, options=opts,
                                     recipe=recipe)))
