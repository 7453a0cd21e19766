"""The ``gguf`` output format's torch-free facts: the one file it writes and what it needs of the run options.

The registry names them without loading ``gguf.py`` (which imports torch), so a missing ``base_gguf`` is
reported in a fraction of a second, before any tensor library is imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..errors import LoraMergeError

GGUF_NAME = "adapter.gguf"


def check_options(opts: Any) -> None:
    """What the ``gguf`` output format needs of the run options (``plan`` stage 3, headers only): a base
    model's .gguf, which must be readable (its architecture, tensor names and shapes)."""
    if opts.base_gguf is None:
        raise LoraMergeError("output format gguf needs the base model's .gguf (tensor names, shapes and "
                             "architecture come from it): pass «base_gguf»", field="base_gguf")
    import_module(f"{__package__}.gguf").resolve_base(opts.base_gguf)
