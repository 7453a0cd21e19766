"""mergekit-lora: merge and compose LoRA adapters as LoRAs, on rank units."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, AdapterMeta, ModuleInfo
from .errors import LoraMergeError
from .formats import load_adapter
from .merge import merge
from .preflight import check_compatible
from .units import RankUnits

from . import routing  # noqa: E402,I001  (registers the routed adapter format)

__all__ = [
    "Adapter", "AdapterMeta", "ModuleInfo", "LoraMergeError", "RankUnits", "check_compatible", "load_adapter",
    "merge", "__version__",
]
