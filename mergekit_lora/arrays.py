"""Dtypes by name and numpy factors stored in them, without torch.

Headers, plans and writers name a dtype by the string torch and numpy use (``"bfloat16"``,
``"float32"``); :func:`torch_dtype` turns a name into the torch dtype where tensors are made.  The
numpy side stores a float array in a factor dtype exactly as torch's ``Tensor.to(dtype)`` does:
float16/float32/float64 by numpy's IEEE round-to-nearest-even casts, and bfloat16 (which numpy lacks)
as the upper 16 bits of float32 rounded to nearest, ties to even — the rule of torch's
``c10::BFloat16``.  A stored array is a :class:`Stored`: the bytes as numpy holds them (``uint16`` for
bfloat16) and the dtype name, which the safetensors writers put in the header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch

# The floating dtypes a LoRA factor may have, narrowest first, and numpy's storage for each.
FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
STORAGE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16), "float32": np.dtype(np.float32),
           "float64": np.dtype(np.float64)}
# The largest finite value of each (bfloat16: (2 − 2⁻⁷)·2¹²⁷), for the output range check.
FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": float(np.finfo(np.float32).max),
             "float64": float(np.finfo(np.float64).max)}


class Stored(NamedTuple):
    """An array as it goes into a file: ``data`` in numpy's storage for ``dtype`` (``uint16`` bits for bfloat16)."""

    data: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


def dtype_name(dtype: Any) -> str:
    """``"bfloat16"`` for ``"bfloat16"``, ``torch.bfloat16`` or ``np.float32`` alike (no torch import)."""
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    if isinstance(dtype, (np.dtype, type)):
        return np.dtype(dtype).name
    return str(dtype).removeprefix("torch.")


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a name (or a torch dtype itself); imports torch, so only where tensors are made."""
    import torch  # lazily: names travel through plans and headers that never need torch

    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype_name(dtype))


def is_float(name: str) -> bool:
    return name in FLOAT_NAMES


def compute_name(name: str) -> str:
    """The precision factor math runs in: float64 stays, every other factor dtype is computed in float32."""
    return "float64" if name == "float64" else "float32"


def promote(a: str, b: str) -> str:
    """torch's ``promote_types`` on factor dtypes: the wider one; float16 with bfloat16 is float32."""
    if a == b:
        return a
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    order = {n: i for i, n in enumerate(FLOAT_NAMES)}
    return max(a, b, key=lambda n: order.get(n, len(order)))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest, ties to even, ±Inf kept; a NaN becomes a quiet NaN
    (torch's vector and scalar conversions differ in its bits; no NaN reaches a file: outputs are checked
    finite first)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def store(x: np.ndarray, name: str) -> Stored:
    """``x`` (float32/float64) in dtype ``name``, rounded as torch's ``Tensor.to`` rounds, C-contiguous."""
    if name == "bfloat16":
        return Stored(bf16_bits(x.astype(np.float32, copy=False)), name)
    if name not in STORAGE:
        raise ValueError(f"cannot store factors as {name}")
    return Stored(np.ascontiguousarray(x, dtype=STORAGE[name]), name)
