"""Adapter formats: where a source is (local path or Hub id), which family it is, and reading it.

``load_adapter`` (:mod:`.load`) is the one way in.  Its names are imported on first use, so that the
torch-free modules of this package (:mod:`.safetensors_header`, :mod:`.peft_layout`, used by
``loramerge inspect``) can be imported without the readers, which need torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"load_adapter": ".load", "resolve_source": ".load"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
