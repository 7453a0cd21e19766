"""mergekit-lora: merge and compose LoRA adapters as LoRAs, on rank units."""

from __future__ import annotations

__version__ = "0.1.0"

from . import routing  # noqa: I001  (last: registers the routed adapter format with the core)
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
