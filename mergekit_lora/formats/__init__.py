"""Adapter formats: detection, reading and writing.

A reader is registered with a ``sniff(keys, metadata) -> bool`` test over a safetensors file's
header; the first match reads the file.  PEFT folders are recognised by ``adapter_config.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import LoraMergeError
from .peft_read import has_peft_keys, read_peft
from .tensors import TensorSource


@dataclass(frozen=True)
class FileReader:
    """A file format: ``sniff`` decides from the header, ``read`` builds the adapter."""

    name: str
    sniff: Callable[[list[str], dict[str, str]], bool]
    read: Callable[..., Adapter]


FILE_READERS: list[FileReader] = [
    FileReader("peft", lambda keys, meta: has_peft_keys(keys), read_peft),
]

# Resolvers turn a non-local source string (e.g. a Hub id ``org/name@rev``) into a local path, or
# into ``(path, extras)`` where ``extras`` is merged into ``adapter.meta.extra`` (e.g. the resolved
# commit as ``resolved_revision``).  They are called as ``resolve(source, allow_pickle=...)`` and
# return None for strings they do not handle.
Resolved = Path | tuple[Path, dict[str, Any]]
SOURCE_RESOLVERS: list[Callable[..., Resolved | None]] = []


def register_reader(reader: FileReader, *, first: bool = False) -> None:
    """Add a file format (SD formats, third-party)."""
    if first:
        FILE_READERS.insert(0, reader)
    else:
        FILE_READERS.append(reader)


def resolve_source(source: str | Path, *, allow_pickle: bool = False) -> Path:
    """A local path for ``source``: itself if it exists, else the first resolver's answer."""
    return resolve_source_meta(source, allow_pickle=allow_pickle)[0]


def resolve_source_meta(source: str | Path, *, allow_pickle: bool = False) -> tuple[Path, dict[str, Any]]:
    """Like :func:`resolve_source`, plus the metadata extras the resolver recorded (may be empty)."""
    p = Path(source)
    if p.exists():
        return p, {}
    for resolve in SOURCE_RESOLVERS:
        try:
            found = resolve(str(source), allow_pickle=allow_pickle)
        except LoraMergeError as e:
            if len(p.parts) > 1 and Path(p.parts[0]).exists():  # e.g. a typo in examples/…: say both readings
                raise LoraMergeError(f"{source}: no such local file or folder (and as a Hub repo: "
                                     f"{str(e).removeprefix(f'{source}: ')})") from None
            raise
        if found is not None:
            return found if isinstance(found, tuple) else (found, {})
    raise LoraMergeError(f"{source}: no such file or folder")


def load_adapter(source: str | Path, *, allow_pickle: bool = False, ignore_modules_to_save: bool = False,
                 strict: bool = True) -> Adapter:
    """Read an adapter from a folder or file (any registered format) into rank units, lazily."""
    path, extras = resolve_source_meta(source, allow_pickle=allow_pickle)
    adapter = _load_local(path, allow_pickle=allow_pickle, ignore_modules_to_save=ignore_modules_to_save,
                          strict=strict)
    if extras:
        adapter.meta.extra.update(extras)
        adapter.label = str(source)
    return adapter


def _load_local(path: Path, *, allow_pickle: bool, ignore_modules_to_save: bool, strict: bool) -> Adapter:
    opts = dict(allow_pickle=allow_pickle, ignore_modules_to_save=ignore_modules_to_save, strict=strict)
    if path.is_dir():
        if (path / "adapter_config.json").is_file() or any(path.glob("adapter_model.*")):
            return read_peft(path, **opts)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraMergeError(
                f"{path}: no adapter_config.json and {len(files)} .safetensors files; point at one adapter file"
            )
        path = files[0]
    src = TensorSource.open(path, allow_pickle=allow_pickle)
    for reader in FILE_READERS:
        if reader.sniff(src.keys, src.metadata):
            return reader.read(path, **opts)
    shown = ", ".join(src.keys[:3])
    raise LoraMergeError(
        f"{path}: not a recognised LoRA format (first keys: {shown or 'none'}); expected PEFT "
        "(…lora_A.weight/…lora_B.weight) or a registered format"
    )


__all__ = ["FileReader", "load_adapter", "register_reader", "resolve_source", "resolve_source_meta",
           "SOURCE_RESOLVERS", "FILE_READERS"]

# Stable Diffusion formats (kohya / diffusers) register their readers, writers and hooks on import.
from . import sd as _sd  # noqa: E402,F401
