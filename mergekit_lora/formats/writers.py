"""The PEFT writer as the format registry calls it (SD and routed writers live with their readers)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, output_meta
from .peft_write import write_peft

if TYPE_CHECKING:
    from ..factor_arrays import ArrayUnits
    from ..units import RankUnits


def peft_writer(out_dir: Path, modules: Iterable[tuple[str, RankUnits | ArrayUnits]], adapters: Sequence[Adapter], *,
                dtype: Any, target_modules: list[str] | None, method: str,
                module_names: Sequence[str] | None = None, profile: str = "default", **_: Any) -> dict[str, Any]:
    meta = output_meta(adapters)
    return write_peft(out_dir, modules, meta, dtype=dtype, target_modules=target_modules,
                      metadata={"mergekit_lora.method": method}, expected_modules=module_names,
                      profile=None if profile == "default" else profile)
