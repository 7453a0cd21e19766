"""Where a source is (local path or Hub id), which family it is, and reading it.

``load_adapter`` is the one way in: a PEFT folder (``adapter_config.json``) is read as PEFT; a
single safetensors file (or a folder holding exactly one) is sniffed on its header against the
format registry (:mod:`mergekit_lora.formats.registry`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import LoraMergeError
from ..hub import parse_hub_id, resolve_hub
from ..sources import did_you_mean, refuse_gguf, split_alpha
from .peft_layout import is_peft_folder
from .peft_read import adapter_from_peft_source, read_peft
from .registry import sniff
from .safetensors_header import content_fingerprints
from .tensors import TensorSource


def resolve_source(source: str | Path, *, allow_pickle: bool = False) -> tuple[Path, dict[str, Any]]:
    """A local path for ``source`` (itself if it exists, else the Hub snapshot) and metadata extras."""
    from ..paths import path_fits

    path_fits(source)  # issue 28: a 300-byte name is one sentence, not an OSError from stat
    p = Path(source)
    if p.exists():
        return p, {}
    if parse_hub_id(str(source)) is not None:
        try:
            return resolve_hub(str(source), allow_pickle=allow_pickle)
        except LoraMergeError as e:
            if len(p.parts) > 1 and Path(p.parts[0]).exists():  # e.g. a typo in examples/…: say both readings
                raise LoraMergeError(f"{source}: no such local file or folder{did_you_mean(p)} (and as a Hub repo: "
                                     f"{str(e).removeprefix(f'{source}: ')})") from None
            raise
    raise LoraMergeError(f"{source}: no such file or folder{did_you_mean(p)}")


def load_adapter(source: str | Path, *, allow_pickle: bool = False, ignore_modules_to_save: bool = False,
                 strict: bool = True) -> Adapter:
    """Read an adapter from a folder, a file or a Hub id (any registered format) into rank units, lazily.

    ``FILE.safetensors:alpha=16`` states the alpha of a bare PEFT file that has no adapter_config.json
    (without it alpha = r is assumed, which is scale 1)."""
    source, alpha = split_alpha(source) if isinstance(source, str) else (source, None)
    path, extras = resolve_source(source, allow_pickle=allow_pickle)
    adapter = _load_local(path, allow_pickle=allow_pickle, ignore_modules_to_save=ignore_modules_to_save,
                          strict=strict)
    if alpha is not None:
        adapter = _with_alpha(adapter, path, alpha, allow_pickle=allow_pickle,
                              ignore_modules_to_save=ignore_modules_to_save, strict=strict)
    if extras:
        adapter.meta.extra.update(extras)
        adapter.label = str(source)
    return adapter


def _with_alpha(adapter: Adapter, path: Path, alpha: float, **opts: Any) -> Adapter:
    """The bare PEFT file at ``path`` read again with ``lora_alpha = alpha`` (only where alpha was assumed)."""
    if adapter.meta.format != "peft" or not adapter.meta.extra.get("alpha_assumed"):
        where = "its adapter_config.json" if adapter.meta.format == "peft" else f"the {adapter.meta.format} file"
        raise LoraMergeError(f"{path}: :alpha= is only for a bare PEFT .safetensors without adapter_config.json; "
                             f"this adapter's alpha comes from {where} — drop :alpha=")
    weights = path if path.is_file() else next(iter(sorted(path.glob("*.safetensors"))))
    src = TensorSource.open(weights, allow_pickle=opts["allow_pickle"])
    out = adapter_from_peft_source(src, {"lora_alpha": alpha}, ignore_modules_to_save=opts["ignore_modules_to_save"],
                                   strict=opts["strict"])
    out.meta.extra["alpha_stated"] = alpha
    return out


def _load_local(path: Path, *, allow_pickle: bool, ignore_modules_to_save: bool, strict: bool) -> Adapter:
    opts = dict(allow_pickle=allow_pickle, ignore_modules_to_save=ignore_modules_to_save, strict=strict)
    if path.is_dir():
        if is_peft_folder(path):
            return read_peft(path, **opts)
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraMergeError(
                f"{path}: no adapter_config.json and {len(files)} .safetensors files; point at one adapter file"
            )
        path = files[0]
    refuse_gguf(path)
    with content_fingerprints(False):  # only sniffed here; the format's reader opens (and fingerprints) it
        src = TensorSource.open(path, allow_pickle=allow_pickle)
    spec = sniff(src.keys, src.metadata)
    if spec is not None and spec.read is not None:
        return spec.read(path, **opts)
    shown = ", ".join(src.keys[:3])
    raise LoraMergeError(
        f"{path}: not a recognised LoRA format (first keys: {shown or 'none'}); expected PEFT "
        "(…lora_A.weight/…lora_B.weight) or a registered format"
    )


__all__ = ["load_adapter", "resolve_source"]
