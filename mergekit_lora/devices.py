"""Where a merge computes and in which dtype it writes, decided from names (torch only when it must say).

A plan holds a device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``) and an output dtype name (``"bfloat16"``);
the torch path turns them into ``torch.device`` / ``torch.dtype`` where it makes tensors.  ``auto`` needs
to know whether CUDA is usable: :func:`cuda_available` answers *no* without importing torch where no CUDA
device can exist (a CPU build of torch, macOS, Linux without an NVIDIA or ROCm driver) and asks torch
otherwise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .arrays import dtype_name, promote
from .errors import LoraMergeError
from .options import check_device, check_dtype

if TYPE_CHECKING:
    import torch

    from .adapter import Adapter

# Linux device nodes of a GPU driver torch.cuda can use (NVIDIA; ROCm builds answer to "cuda" too).
DRIVER_NODES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def cuda_impossible() -> bool:
    """True when ``torch.cuda.is_available()`` is certainly False, found without importing torch."""
    if sys.modules.get("torch") is not None:
        return False  # torch is loaded anyway: let it answer
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return True
    if version.endswith("+cpu") or sys.platform == "darwin":
        return True
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in DRIVER_NODES)


def cuda_available() -> bool:
    if cuda_impossible():
        return False
    import torch  # lazily: only where a CUDA device may exist

    return bool(torch.cuda.is_available())


def device_name(device: Any = "auto") -> str:
    """The device a merge computes on, by name: ``auto`` is CUDA when available, else the CPU; ``cuda``
    without CUDA is an error, not a fallback."""
    d = str(device)
    try:
        check_device(d)
    except ValueError as e:
        raise LoraMergeError(str(e), field="device") from None
    if d == "auto":
        return "cuda" if cuda_available() else "cpu"
    if d.startswith("cuda") and not cuda_available():
        raise LoraMergeError("«device» cuda was requested but CUDA is not available on this machine; use «device» cpu",
                             field="device")
    return d


def resolve_device(device: Any = "auto") -> torch.device:
    """:func:`device_name` as a ``torch.device`` (imports torch)."""
    import torch  # lazily: callers that make tensors

    return torch.device(device_name(device))


def resolve_dtype(dtype: Any, adapters: Sequence[Adapter]) -> str:
    """The output dtype's name: the requested one (a name or a torch dtype), else the inputs' (promoted if
    they differ)."""
    if dtype is not None and not isinstance(dtype, str):
        return dtype_name(dtype)
    if dtype:
        try:
            return check_dtype(dtype)
        except ValueError as e:
            raise LoraMergeError(str(e), field="dtype") from None
    out = dtype_name(adapters[0].meta.dtype)
    for a in adapters[1:]:
        out = promote(out, dtype_name(a.meta.dtype))
    return out
