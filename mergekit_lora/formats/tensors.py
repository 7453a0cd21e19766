"""Uniform, lazy access to the tensors of an adapter file (safetensors, or an opted-in pickle)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save

from ..errors import LoraMergeError
from .safetensors_header import SafetensorsHeader, read_header

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
# Factor dtypes the math can use (float8 and integers are refused by name, never reinterpreted).
FACTOR_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


class TensorSource(SafetensorsHeader):
    """A :class:`SafetensorsHeader` (or an opted-in pickle's tensors) whose data comes back as torch tensors."""

    def __init__(self, path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, torch.dtype], metadata: dict[str, str],
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
        dtypes = {k: _ST_DTYPES.get(n, torch.uint8) for k, n in names.items()}
        src = cls(path, keys, shapes, dtypes, metadata)
        src.dtype_names = names
        src._record(stat)
        return src

    def dtype_name(self, key: str) -> str:
        return self.dtype_names.get(key) or str(self.dtypes[key]).removeprefix("torch.")

    def factor_code(self, key: str) -> str | None:
        if key in self.dtype_names:
            return super().factor_code(key)
        return FACTOR_DTYPES.get(self.dtypes[key])  # a pickle's tensor: by its torch dtype

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
            dtype, shape = self.dtypes[key], self.shapes[key]
            t = torch.empty(shape, dtype=dtype)  # no zero-fill: read straight into it
            self.read_into(key, memoryview(t.view(-1).view(torch.uint8).numpy()), f"{dtype} {tuple(shape)}")
        if t.is_floating_point() and t.dtype in FACTOR_DTYPES and not all_finite(t):
            raise LoraMergeError(f"{self.path}: tensor {key} contains NaN or Inf values; the adapter is corrupt")
        return t


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN/Inf: one summing pass in the tensor's own dtype (a NaN/Inf entry makes
    the sum non-finite); only a non-finite sum (or an overflowing one) pays for the exact check."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only=True``): a pickle that asks for anything else is refused in one
    sentence; torch's own advice to disable the safeguard is not passed on."""
    import warnings

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in at least float32; float64 inputs keep float64."""
    return torch.promote_types(dtype, torch.float32)


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


def canonical_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A whole safetensors file as bytes with a deterministic header (hashed before writing: SD formats)."""
    blob = save(dict(tensors), dict(metadata))
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[:8] + _sorted_header(blob[8:8 + n]) + blob[8 + n:]
