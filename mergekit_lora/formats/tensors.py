"""Uniform, lazy access to the tensors of an adapter file (safetensors, or an opted-in pickle)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoraMergeError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorSource:
    """Keys, shapes and dtypes from the header; tensor data only when asked for."""

    def __init__(self, path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype], metadata: dict[str, str],
                 tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.path = path
        self.keys = keys
        self.shapes = shapes
        self.dtypes = dtypes
        self.metadata = metadata
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
                    "safetensors, or pass --allow-pickle if you trust its origin"
                )
            return cls.from_tensors(path, _load_pickle(path))
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                dtypes = {k: _ST_DTYPES.get(f.get_slice(k).get_dtype(), torch.float32) for k in keys}
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise LoraMergeError(f"{path}: not a readable safetensors file ({e})") from None
        return cls(path, keys, shapes, dtypes, metadata)

    @classmethod
    def from_tensors(cls, path: Path, tensors: Mapping[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> TensorSource:
        return cls(Path(path), list(tensors), {k: tuple(v.shape) for k, v in tensors.items()},
                   {k: v.dtype for k, v in tensors.items()}, dict(metadata or {}), tensors)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor, refusing NaN/Inf with the file and key named."""
        if self._tensors is not None:
            t = self._tensors[key]
        else:
            try:
                with safe_open(str(self.path), framework="pt") as f:
                    t = f.get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise LoraMergeError(f"{self.path}: cannot read tensor {key} ({e})") from None
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LoraMergeError(f"{self.path}: tensor {key} contains NaN or Inf values; the adapter is corrupt")
        return t


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure is a bad file
        raise LoraMergeError(f"{path}: cannot read pickle file ({e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoraMergeError(f"{path}: expected a dict of tensors")
    return sd


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in at least float32; float64 inputs keep float64."""
    return torch.promote_types(dtype, torch.float32)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a byte-stable header.

    safetensors serialises ``__metadata__`` from a hash map, so with two or more entries their order (and
    the file's bytes) changes from run to run; we rewrite the header JSON with sorted keys — same
    length, same content — so the same inputs and seed give identical bytes.
    """
    import json
    import struct

    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canon = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canon) > n:  # never happens for a reordering; refuse rather than corrupt the file
            raise RuntimeError(f"{path}: cannot canonicalise the safetensors header")
        f.seek(8)
        f.write(canon + b" " * (n - len(canon)))
