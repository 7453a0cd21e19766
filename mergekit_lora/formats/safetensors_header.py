"""A safetensors file's header and byte ranges, without torch: keys, shapes, dtype codes, metadata.

:class:`SafetensorsHeader` is what every reader learns before any tensor data is read (and what
``loramerge inspect`` needs for a PEFT adapter, with :meth:`SafetensorsHeader.array` giving factors as
numpy arrays); :class:`~mergekit_lora.formats.tensors.TensorSource` extends it with torch tensors.
The header is validated by ``safetensors.safe_open``; data is read by byte range through one kept file
descriptor, after checking that the file did not change since its header was read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..errors import LoraMergeError

# The dtype codes a LoRA factor may have (float8 and integers are refused by name, never reinterpreted).
FACTOR_CODES = ("F64", "F32", "F16", "BF16")
# dtype code -> the name torch and numpy use ("float32"), for reports.
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
# Issue 28, ``MergeOptions.verify_inputs``: while set, every header opened also fingerprints each tensor's
# bytes (BLAKE2b-128 of its byte range); each later read is checked against it.
_VERIFY = ContextVar("verify_inputs", default=False)
_CHUNK = 1 << 24
_OPEN_LOCK = threading.Lock()  # one RangeReader per header, also when threads read modules side by side


@contextlib.contextmanager
def content_fingerprints(on: bool = True) -> Iterator[None]:
    """Inside: headers opened record a content fingerprint of every tensor (read back and checked later)."""
    token = _VERIFY.set(on)
    try:
        yield
    finally:
        _VERIFY.reset(token)


def _digest(view: memoryview | bytes) -> bytes:
    return hashlib.blake2b(view, digest_size=16).digest()


# numpy storage of the factor codes (bfloat16 as its raw 16 bits: numpy has no bfloat16).
_NP_STORAGE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
READ_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, struct.error)


def read_header(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, str], dict[str, str],
                                      tuple[int, int]]:
    """(keys, shapes, dtype codes, metadata, (size, mtime_ns)) of a safetensors file, validated by safe_open."""
    try:
        st = path.stat()
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            names = {k: str(f.get_slice(k).get_dtype()) for k in keys}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraMergeError(f"{path}: not a readable safetensors file ({e})") from None
    _refuse_duplicate_names(path)
    return keys, shapes, names, metadata, (st.st_size, st.st_mtime_ns)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for k, v in pairs:
        if k in seen:
            raise _Duplicate(k)
        seen[k] = v
    return seen


class _Duplicate(Exception):
    pass


def _refuse_duplicate_names(path: Path) -> None:
    """A header naming one tensor (or metadata key) twice is ambiguous (JSON keeps the last, another
    reader may keep the first): refused (issue 28).  safe_open has validated the header already."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            raw = f.read(n)
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise LoraMergeError(f"{path}: the safetensors header names {e.args[0]!r} more than once; the file is "
                             "ambiguous (corrupt or hand-edited), re-export the adapter") from None
    except (OSError, ValueError, struct.error) as e:
        raise LoraMergeError(f"{path}: not a readable safetensors file ({e})") from None


class SafetensorsHeader:
    """Keys, shapes, dtype codes and metadata of one adapter file; tensor bytes only when asked for."""

    def __init__(self, path: Path, keys: list[str], shapes: dict[str, tuple[int, ...]],
                 metadata: dict[str, str]) -> None:
        self.path = path
        self.keys = keys
        self.shapes = shapes
        self.metadata = metadata
        self.dtype_names: dict[str, str] = {}  # the header's own dtype codes (safetensors files)
        self._stat: tuple[int, int] | None = None  # (size, mtime_ns) when the header was read
        self._reader: RangeReader | None = None
        self._digests: dict[str, bytes] | None = None  # key -> BLAKE2b of its bytes (verify_inputs)

    def _record(self, stat: tuple[int, int]) -> None:
        """Remember the file as it is now: size and mtime, and (``verify_inputs``) each tensor's bytes' digest."""
        self._stat = stat
        if _VERIFY.get():
            try:
                if self._reader is None:
                    self._reader = RangeReader(self.path)
                self._digests = {k: self._reader.digest(k) for k in self.keys}
            except READ_ERRORS as e:
                raise LoraMergeError(f"{self.path}: cannot fingerprint its tensors ({type(e).__name__}: {e})") from None

    @classmethod
    def open(cls, path: Path) -> SafetensorsHeader:
        path = Path(path)
        keys, shapes, names, metadata, stat = read_header(path)
        h = cls(path, keys, shapes, metadata)
        h.dtype_names = names
        h._record(stat)
        return h

    def dtype_name(self, key: str) -> str:
        return self.dtype_names[key]

    def factor_code(self, key: str) -> str | None:
        """The key's dtype code when it is a LoRA factor dtype (F64/F32/F16/BF16), else None."""
        code = self.dtype_names.get(key)
        return code if code in FACTOR_CODES else None

    def check_factor(self, key: str, min_ndim: int = 2) -> tuple[int, ...]:
        """Refuse a LoRA factor that is not float16/bfloat16/float32/float64, has fewer than ``min_ndim``
        dimensions, or has a zero-sized dimension (rank 0); returns its shape."""
        shape = self.shapes[key]
        if self.factor_code(key) is None:
            raise LoraMergeError(f"{self.path}: tensor {key} has dtype {self.dtype_name(key)}; LoRA factors must be "
                                 "floating point (F32, F16, BF16 or F64)")
        if len(shape) < min_ndim:
            raise LoraMergeError(f"{self.path}: tensor {key} has shape {list(shape)}; a LoRA factor is a matrix "
                                 f"(at least {min_ndim} dimensions)")
        if any(d == 0 for d in shape):
            raise LoraMergeError(f"{self.path}: tensor {key} has shape {list(shape)} with a zero dimension "
                                 "(rank 0 or an empty layer); remove the module or re-export the adapter")
        return shape

    def read_into(self, key: str, view: memoryview, what: str) -> None:
        """Fill ``view`` with tensor ``key``'s bytes (``what`` names its dtype and shape in errors)."""
        self._check_unchanged()
        try:
            if self._reader is None:
                with _OPEN_LOCK:
                    if self._reader is None:
                        self._reader = RangeReader(self.path)
            self._reader.read_into(key, view, what)
        except READ_ERRORS as e:
            raise LoraMergeError(f"{self.path}: cannot read tensor {key} ({type(e).__name__}: {e})") from None
        if self._digests is not None and key in self._digests and _digest(view) != self._digests[key]:
            raise LoraMergeError(f"{self.path}: tensor {key} changed after the merge was planned (its bytes differ "
                                 "from the content fingerprint taken then, though size and modification time "
                                 "did not change); run again when the input is no longer being written")

    def array(self, key: str) -> np.ndarray:
        """A LoRA factor as a numpy array in its math precision (float64 stays, the rest becomes float32;
        bfloat16 exactly, as its bits << 16), refusing NaN/Inf like :meth:`TensorSource.get`."""
        code = self.factor_code(key)
        if code is None:
            raise ValueError(f"{key} is not a floating-point factor")
        shape = self.shapes[key]
        raw = np.empty(shape, dtype=_NP_STORAGE[code])
        self.read_into(key, memoryview(raw.reshape(-1).view(np.uint8)), f"{DTYPE_NAMES[code]} {shape}")
        if code == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw if code in ("F32", "F64") else raw.astype(np.float32)
        if not finite(out):
            raise LoraMergeError(f"{self.path}: tensor {key} contains NaN or Inf values; the adapter is corrupt")
        return out

    def _check_unchanged(self) -> None:
        """Refuse when the file's size or modification time differs from when its header was read."""
        if self._stat is None:
            return
        try:
            st = self.path.stat()
        except OSError:
            raise LoraMergeError(f"{self.path}: the file disappeared after its header was read; run again when "
                                 "it is no longer being written") from None
        if (st.st_size, st.st_mtime_ns) != self._stat:
            raise LoraMergeError(f"{self.path}: the file changed after its header was read (size or modification "
                                 "time); run again when it is no longer being written")


def finite(a: np.ndarray) -> bool:
    """True when no entry is NaN/Inf: one sum first, the exact check only when the sum is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum()):
            return True
    return bool(np.isfinite(a).all())


class RangeReader:
    """Reads one tensor's byte range with plain file reads.

    The file was validated by ``safe_open`` when the header was read; reading ranges through one
    kept file descriptor avoids re-parsing the header per tensor and keeps no mapping alive, so
    resident memory stays one module's tensors however large the file is.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open for the source's lifetime
        (n,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(n))
        self._base = 8 + n
        self._ranges = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}

    def digest(self, key: str) -> bytes:
        """BLAKE2b-128 of tensor ``key``'s bytes, read in 16 MiB chunks."""
        start, end = self._ranges[key]
        h = hashlib.blake2b(digest_size=16)
        self._file.seek(self._base + start)
        left = end - start
        while left > 0:
            chunk = self._file.read(min(left, _CHUNK))
            if not chunk:
                raise OSError(f"unexpected end of file reading {key}")
            h.update(chunk)
            left -= len(chunk)
        return h.digest()

    def read_into(self, key: str, view: memoryview, what: str) -> None:
        start, end = self._ranges[key]
        if len(view) != end - start:
            raise ValueError(f"{end - start} bytes do not hold {what}")
        got, fd = 0, self._file.fileno()
        while got < len(view):
            n = os.preadv(fd, [view[got:]], self._base + start + got)
            if not n:
                raise OSError(f"unexpected end of file reading {key}")
            got += n

    def __del__(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None:
            f.close()
