"""Output writers by format name; SD formats register theirs here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, AdapterMeta
from ..errors import LoraMergeError
from ..units import RankUnits
from .peft_write import write_peft

# A writer: (out_dir, modules, input adapters, dtype, target_modules, method, **extra) -> config dict.
# ``extra`` may hold ``recipe`` (params, weights, seed) for formats that record it in their header, and
# ``module_names`` (the modules that will arrive, in plan order) for writers that can use it.
Writer = Callable[..., dict[str, Any]]


def _peft_writer(out_dir: Path, modules: Iterable[tuple[str, RankUnits]], adapters: Sequence[Adapter], *,
                 dtype: torch.dtype, target_modules: list[str] | None, method: str,
                 module_names: Sequence[str] | None = None, **_: Any) -> dict[str, Any]:
    meta = output_meta(adapters)
    return write_peft(out_dir, modules, meta, dtype=dtype, target_modules=target_modules,
                      metadata={"mergekit_lora.method": method}, expected_modules=module_names)


WRITERS: dict[str, Writer] = {"peft": _peft_writer}
# Which output format an input format family writes by default.
FAMILY_OUTPUT: dict[str, str] = {"peft": "peft", "memory": "peft"}


def output_meta(adapters: Sequence[Adapter]) -> AdapterMeta:
    """Metadata carried to the output: the first input's, with fields that vary across inputs cleared."""
    first = adapters[0].meta
    bases = {a.meta.base_model for a in adapters if a.meta.base_model}
    tasks = {a.meta.task_type for a in adapters if a.meta.task_type}
    fifo = {a.meta.fan_in_fan_out for a in adapters}
    return AdapterMeta(
        format=first.format,
        base_model=next(iter(bases)) if len(bases) == 1 else None,
        revision=first.revision if len(adapters) == 1 else None,
        task_type=next(iter(tasks)) if len(tasks) == 1 else None,
        target_modules=None,
        fan_in_fan_out=fifo == {True},
        dtype=first.dtype,
        config={},
        extra=dict(first.extra),
    )


def default_output_format(adapters: Sequence[Adapter]) -> str:
    fams = {FAMILY_OUTPUT.get(a.meta.format, "peft") for a in adapters}
    return fams.pop() if len(fams) == 1 else "peft"


def write_adapter(fmt: str, out_dir: Path, modules: Iterable[tuple[str, RankUnits]], adapters: Sequence[Adapter],
                  *, dtype: torch.dtype, target_modules: list[str] | None = None, method: str = "",
                  recipe: dict[str, Any] | None = None, module_names: Sequence[str] | None = None) -> dict[str, Any]:
    if fmt not in WRITERS:
        raise LoraMergeError(f"unknown output format {fmt!r}; available: {', '.join(sorted(WRITERS))}")
    extra: dict[str, Any] = {"recipe": recipe} if recipe is not None else {}
    if module_names is not None:
        extra["module_names"] = list(module_names)
    return WRITERS[fmt](out_dir, modules, adapters, dtype=dtype, target_modules=target_modules, method=method,
                        **extra)
