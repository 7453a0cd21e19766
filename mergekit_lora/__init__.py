"""mergekit-lora: merge and compose LoRA adapters as LoRAs, on rank units."""

from __future__ import annotations

__version__ = "0.1.0"

from . import hub, routing  # noqa: F401  (register the Hub source resolver and the routed format)
from .adapter import Adapter, AdapterMeta, ModuleInfo
from .errors import LoraMergeError
from .formats import load_adapter
from .merge import merge
from .preflight import check_compatible
from .units import RankUnits

__all__ = [
    "Adapter", "AdapterMeta", "ModuleInfo", "LoraMergeError", "RankUnits", "check_compatible", "load_adapter",
    "merge", "routing", "__version__",
]
