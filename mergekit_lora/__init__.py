"""mergekit-lora: merge and compose LoRA adapters as LoRAs, on rank units.

The public API; names are imported on first use (``import mergekit_lora`` does not import torch)::

    from mergekit_lora import MergeOptions, MergeRequest, load_adapter, merge, plan, execute
    result = merge(["a", "b"], "svd", "merged", params={"rank": 8}, weights=[0.5, 0.5])
    p = plan(MergeRequest(sources=["a", "b"], method="svd", params={"rank": 8}, options=MergeOptions(out="m")))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": ".adapter", "AdapterMeta": ".adapter", "ModuleInfo": ".adapter",
    "LoraMergeError": ".errors", "MergeOptions": ".options", "MergeRequest": ".request",
    "ModuleOverride": ".request", "RankUnits": ".units",
    "load_adapter": ".formats", "check_compatible": ".pipeline.compat",
    "plan": ".pipeline", "execute": ".pipeline", "merge": ".pipeline", "MergePlan": ".pipeline",
    "MergeResult": ".pipeline", "route": ".routing.api", "routing": ".routing",
    "export": ".pipeline.output",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module(_EXPORTS[name], __name__)
    return module if name == "routing" else getattr(module, name)
