"""Uniform, lazy access to the tensors of an adapter file (safetensors, or an opted-in pickle).

Opening reads the header only and imports no torch: dtypes are names (``"bfloat16"``); :meth:`TensorSource.get`
makes torch tensors, :meth:`~.safetensors_header.SafetensorsHeader.array` numpy ones (safetensors files).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..arrays import Stored, dtype_name, from_bf16_bits
from ..errors import LoraMergeError
from .safetensors_header import DTYPE_NAMES, SafetensorsHeader, read_header

if TYPE_CHECKING:
    import torch

# Factor dtypes the math can use, by name (float8 and integers are refused by name, never reinterpreted).
FACTOR_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


class TensorSource(SafetensorsHeader):
    """A :class:`SafetensorsHeader` (or an opted-in pickle's tensors) whose data comes back as torch tensors."""

    def __init__(self, path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, str], metadata: dict[str, str],
                 tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(path, keys, shapes, metadata)
        self.dtypes = dtypes
        self._tensors = tensors

    @classmethod
    def open(cls, path: Path, *, allow_pickle: bool = False) -> TensorSource:
        path = Path(path)
        if not path.is_file():
            raise LoraMergeError(f"{path}: no such file")
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            if not allow_pickle:
                raise LoraMergeError(
                    f"{path}: pickle files can run code when loaded and are refused; convert it to "
                    "safetensors, or pass «allow_pickle» if you trust its origin"
                )
            return cls.from_tensors(path, _load_pickle(path))
        keys, shapes, names, metadata, stat = read_header(path)
        # an unknown dtype string keeps a byte dtype as a placeholder: check_factor refuses it by name
        dtypes = {k: DTYPE_NAMES.get(n, "uint8") for k, n in names.items()}
        src = cls(path, keys, shapes, dtypes, metadata)
        src.dtype_names = names
        src._record(stat)
        return src

    def dtype_name(self, key: str) -> str:
        return self.dtype_names.get(key) or self.dtypes[key]

    def factor_code(self, key: str) -> str | None:
        if key in self.dtype_names:
            return super().factor_code(key)
        return FACTOR_DTYPES.get(self.dtypes[key])  # a pickle's tensor: by its torch dtype

    @classmethod
    def from_tensors(cls, path: Path, tensors: Mapping[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> TensorSource:
        return cls(Path(path), list(tensors), {k: tuple(v.shape) for k, v in tensors.items()},
                   {k: dtype_name(v.dtype) for k, v in tensors.items()}, dict(metadata or {}), tensors)

    @property
    def has_arrays(self) -> bool:
        """A safetensors file (its factors can be read as numpy arrays); False for a pickle's tensors."""
        return self._tensors is None

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor, refusing NaN/Inf with the file and key named."""
        import torch  # lazily: headers (plans, inspect) and numpy reads need no torch

        if self._tensors is not None:
            t = self._tensors[key]
        else:
            dtype, shape = getattr(torch, self.dtypes[key]), self.shapes[key]
            t = torch.empty(shape, dtype=dtype)  # no zero-fill: read straight into it
            self.read_into(key, memoryview(t.view(-1).view(torch.uint8).numpy()), f"{dtype} {tuple(shape)}")
        if t.is_floating_point() and dtype_name(t.dtype) in FACTOR_DTYPES and not all_finite(t):
            raise LoraMergeError(f"{self.path}: tensor {key} contains NaN or Inf values; the adapter is corrupt")
        return t

    def get_into(self, key: str, out: torch.Tensor, check: bool = True) -> bool:
        """Read a float32/float64 tensor ``key`` straight into ``out`` (on the CPU, contiguous, its stored dtype
        and number of entries, any shape), refusing NaN/Inf as :meth:`get` does; False (nothing read) when
        ``out`` cannot take the bytes as stored (another dtype or size, a strided view, a pickle's tensors).
        ``check=False`` skips the NaN/Inf check: the caller checks (``Adapter.check_read``)."""
        name = dtype_name(out.dtype)
        if (self._tensors is not None or name not in ("float32", "float64") or self.dtypes.get(key) != name
                or not out.is_contiguous() or out.numel() != math.prod(self.shapes[key]) or out.device.type != "cpu"):
            return False
        self.read_into(key, memoryview(out.view(-1).numpy().view(np.uint8)), f"{name} {self.shapes[key]}")
        if check and not all_finite(out):
            raise LoraMergeError(f"{self.path}: tensor {key} contains NaN or Inf values; the adapter is corrupt")
        return True

    def scalar(self, key: str) -> float:
        """A one-element numeric tensor (an alpha) as a float, read with numpy from a safetensors file (no
        torch); the caller has checked its dtype and shape.  NaN/Inf is refused as :meth:`get` refuses it."""
        if self._tensors is not None:
            return float(self.get(key).double().reshape(-1)[0])
        name = self.dtypes[key]
        raw = np.empty(self.shapes[key], dtype=np.uint16 if name == "bfloat16" else np.dtype(name))
        self.read_into(key, memoryview(raw.reshape(-1).view(np.uint8)), f"{name} {self.shapes[key]}")
        value = float((from_bf16_bits(raw) if name == "bfloat16" else raw).reshape(-1)[0])
        if name in FACTOR_DTYPES and not np.isfinite(value):
            raise LoraMergeError(f"{self.path}: tensor {key} contains NaN or Inf values; the adapter is corrupt")
        return value


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN/Inf: one summing pass in the tensor's own dtype (a NaN/Inf entry makes
    the sum non-finite); only a non-finite sum (or an overflowing one) pays for the exact check."""
    import torch  # lazily: see TensorSource.get

    if math.isfinite(t.sum().item()):  # a Python float: no second tensor op per factor
        return True
    return bool(torch.isfinite(t).all())


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only=True``): a pickle that asks for anything else is refused in one
    sentence; torch's own advice to disable the safeguard is not passed on."""
    import warnings

    import torch  # lazily: only a pickle needs torch to be read

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure is a bad or unsafe file
        raise LoraMergeError(f"{path}: cannot be read as a plain dict of tensors (it is damaged, or it asks to run "
                             "code or build other objects, which is refused); convert it to safetensors") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise LoraMergeError(f"{path}: expected a dict of tensors keyed by name; convert it to safetensors")
    return sd


def compute_dtype(dtype: str) -> torch.dtype:
    """Math runs in at least float32; float64 inputs keep float64 (``dtype``: a name; returns torch's)."""
    import torch  # lazily: see TensorSource.get

    return torch.float64 if dtype_name(dtype) == "float64" else torch.float32


def _sorted_header(raw: bytes) -> bytes:
    """The same safetensors header JSON with ``__metadata__`` keys sorted, padded to the same length.

    safetensors (0.8) serialises ``__metadata__`` from a Rust HashMap, so with two or more metadata
    keys the order (and the file's bytes) changes from run to run; sorting makes outputs reproducible.
    """
    header = json.loads(raw)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    out = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(out) > len(raw):  # cannot happen for a re-ordering; refuse rather than corrupt the file
        raise RuntimeError("canonical safetensors header is longer than the original")
    return out + b" " * (len(raw) - len(out))


def _numpy_blob(tensors: Mapping[str, Stored], metadata: Mapping[str, str]) -> bytes:
    """``safetensors.numpy.save`` of the stored arrays, bfloat16 ones (saved as their uint16 bits) relabelled
    ``BF16`` in the header: the bytes ``safetensors.torch.save`` writes for the same tensors (a 2-byte dtype
    sorts among the same neighbours either way, and the header is padded to 8 bytes as safetensors pads it)."""
    from safetensors.numpy import save

    blob = save({k: t.data for k, t in tensors.items()}, dict(metadata))
    bf16 = [k for k, t in tensors.items() if t.dtype == "bfloat16"]
    if not bf16:
        return blob
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    for k in bf16:
        header[k]["dtype"] = "BF16"
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + blob[8 + n:]


def canonical_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    """A whole safetensors file as bytes with a deterministic header (hashed before writing: SD formats).

    ``tensors``: torch tensors, or numpy :class:`~mergekit_lora.arrays.Stored` arrays (bfloat16 as its bits);
    either way the bytes are those of ``safetensors.torch.save`` (the same ``serialize`` call)."""
    if all(isinstance(t, Stored) for t in tensors.values()):
        blob = _numpy_blob(tensors, metadata)
    else:
        from safetensors.torch import save  # torch tensors: torch is already imported

        blob = save(dict(tensors), dict(metadata))
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[:8] + _sorted_header(blob[8:8 + n]) + blob[8 + n:]
