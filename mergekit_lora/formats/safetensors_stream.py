"""A ``.safetensors`` file written tensor by tensor, in memory bounded by one tensor.

``safetensors.torch.save_file`` needs every tensor in memory at once, so a merge that streams
modules would still hold its whole output until the end.  Here each tensor's bytes go to disk as
they arrive; ``close()`` writes the 8-byte header length and the JSON header (keys sorted by name,
``__metadata__`` sorted, padded with spaces as the format allows).  With a ``header_budget`` (an
upper bound of the header's size, from the tensor names the caller expects) the data goes straight
into the output after a reserved header region; without one, or if the header outgrows it, the data
goes to a temp file first and is copied behind the header.  A tensor is a torch tensor or a numpy
:class:`~mergekit_lora.arrays.Stored` array (its bytes and dtype name); this module imports no torch.  The layout is the safetensors format
(little-endian, C order, contiguous data, no holes); the tests read the files back with
``safetensors`` itself.  The same tensors in the same arrival order give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import Stored, dtype_name

# dtype name (torch's and numpy's) -> safetensors code
_DTYPE_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
# Header bytes one tensor entry can take beyond its quoted name: dtype, up to 4 dims of 10 digits,
# two offsets of 20 digits, and the JSON punctuation.
ENTRY_BOUND = 140


class SafetensorsStream:
    """``add(name, tensor)`` any number of times, then ``close()``; ``abort()`` removes what was written."""

    def __init__(self, path: Path, metadata: Mapping[str, str] | None = None, *,
                 header_budget: int | None = None) -> None:
        self.path = Path(path)
        self._metadata = dict(sorted((metadata or {}).items()))
        self._reserved = None if header_budget is None else header_budget + (-header_budget % 8)
        self._tmp_path = self.path.with_name(self.path.name + ".data.tmp")
        self._data_path = self._tmp_path if self._reserved is None else self.path  # where the data goes
        self._data = open(self._data_path, "w+b")  # noqa: SIM115 - closed in close()/abort()
        if self._reserved is not None:
            self._data.seek(8 + self._reserved)
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def add(self, name: str, tensor: Any) -> None:
        """Append ``tensor`` (a torch tensor, or a numpy :class:`Stored` array) under ``name``."""
        if name in self._entries:
            raise ValueError(f"tensor {name!r} was already written")
        dtype = tensor.dtype if isinstance(tensor, Stored) else dtype_name(tensor.dtype)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"safetensors cannot store dtype {tensor.dtype} ({name})")
        if isinstance(tensor, Stored):
            data = np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)
        else:
            import torch  # a torch tensor: torch is already imported by whoever made it

            t = tensor.detach().to("cpu").contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy()
        nbytes = int(data.size)
        if nbytes:
            self._data.write(memoryview(data))
        self._entries[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes

    def _header(self) -> bytes:
        header: dict[str, Any] = {"__metadata__": self._metadata} if self._metadata else {}
        header.update(sorted(self._entries.items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return raw + b" " * (-len(raw) % 8)

    def close(self) -> None:
        raw = self._header()
        if self._reserved is not None and len(raw) <= self._reserved:
            self._data.seek(0)
            self._data.write(struct.pack("<Q", self._reserved) + raw + b" " * (self._reserved - len(raw)))
            self._data.close()
            return
        if self._reserved is not None:  # the header outgrew its budget: move the data behind it
            os.replace(self.path, self._tmp_path)
            self._data_path = self._tmp_path
        self._data.seek(0 if self._reserved is None else 8 + self._reserved)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(self._data, out, 16 << 20)
        self._data.close()
        os.remove(self._data_path)

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
        if self._data_path.exists():
            os.remove(self._data_path)

    def __enter__(self) -> SafetensorsStream:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def header_budget(names: list[str], metadata: Mapping[str, str] | None = None) -> int:
    """An upper bound of the header size for tensors with these names (any dtype, ≤ 4 dims)."""
    meta = json.dumps({"__metadata__": dict(metadata or {})}, ensure_ascii=False).encode()
    return len(meta) + 16 + sum(len(json.dumps(n, ensure_ascii=False).encode()) + ENTRY_BOUND for n in names)
