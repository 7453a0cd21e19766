"""Rank routing: FlyLoRA / SMoRA-style routed composition of frozen LoRAs.

The routed format (``formats/routed.py``) is one entry of the format registry; ``runtime.py`` attaches
routed adapters to a torch model; ``route()`` (``api.py``) is a thin caller of the merge pipeline plus
optional calibration.  Names are imported on first use, so
importing this package costs nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "RoutedAdapter": "..formats.routed", "RoutedUnits": "..formats.routed", "load_routed": "..formats.routed",
    "write_routed": "..formats.routed", "attach": ".runtime", "detach": ".runtime",
    "Calibration": ".api", "RouteResult": ".api", "route": ".api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
