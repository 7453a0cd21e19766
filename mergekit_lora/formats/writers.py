"""The PEFT writer as the format registry calls it (SD and routed writers live with their readers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..adapter import output_meta
from .peft_write import write_peft
from .request import WriteRequest


@dataclass(frozen=True)
class PeftOptions:
    """The PEFT writer's own options: ``profile`` (``default`` or ``portable``: the serving profile)."""

    profile: str = "default"


def peft_options(opts: Any) -> PeftOptions:
    """The ``write_options`` hook: the PEFT options out of the run options (``MergeOptions``)."""
    return PeftOptions(profile=opts.profile)


def peft_writer(req: WriteRequest) -> dict[str, Any]:
    """``req.modules`` hold ``RankUnits`` or numpy ``ArrayUnits`` (a torch-free merge)."""
    o = req.options if isinstance(req.options, PeftOptions) else PeftOptions()
    return write_peft(req.out_dir, req.modules, output_meta(req.adapters), dtype=req.dtype,
                      target_modules=req.target_modules, metadata={"mergekit_lora.method": req.method},
                      expected_modules=req.module_names, profile=None if o.profile == "default" else o.profile)
