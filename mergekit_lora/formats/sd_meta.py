"""kohya / A1111 header metadata: carried fields, sd-scripts' model hashes, the merge recipe.

Hashes follow kohya sd-scripts and the ModelSpec: ``sshs_model_hash`` is the sha256 of the
safetensors data section (everything after the 8-byte length and the JSON header) of the file
serialised with only its ``ss_*`` metadata; ``sshs_legacy_hash`` is the first 8 hex digits of the
sha256 of bytes 0x100000..0x110000 of that same serialisation; ``modelspec.hash_sha256`` is
``0x`` + the sha256 of the data section.  The data section does not depend on the metadata, so
``sshs_model_hash`` and ``modelspec.hash_sha256`` hash the same bytes as the file we write.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapter import Adapter
from .tensors import canonical_bytes  # noqa: F401  (re-exported for the SD writers)

# Carried from the inputs when every input agrees (they describe the base model and the network type).
CARRIED = ("ss_network_module", "ss_base_model_version", "ss_v2", "ss_sd_model_name", "modelspec.architecture",
           "modelspec.implementation", "modelspec.resolution", "modelspec.prediction_type",
           "modelspec.sai_model_spec")


def data_section(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 + n:]


def file_data_sha256(path: Path) -> str:
    """sha256 of a safetensors file's data section, streamed (what sd-scripts calls the model hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def kohya_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, str]:
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = canonical_bytes(tensors, ss_only)
    model = hashlib.sha256(data_section(blob)).hexdigest()
    legacy = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": f"0x{model}"}


def _agreed(adapters: Sequence[Adapter], key: str) -> str | None:
    vals = {str(a.meta.extra.get("metadata", {}).get(key)) for a in adapters}
    vals.discard("None")
    return vals.pop() if len(vals) == 1 else None


def _title(a: Adapter) -> str:
    return str(a.meta.extra.get("metadata", {}).get("modelspec.title") or a.label)


def kohya_metadata(adapters: Sequence[Adapter], ranks: Sequence[int], *, method: str,
                   recipe: Mapping[str, object] | None) -> dict[str, str]:
    """The header of a written kohya file, before hashes: carried fields, dim/alpha of this file, recipe."""
    md: dict[str, str] = {}
    for key in CARRIED:
        v = _agreed(adapters, key)
        if v is not None:
            md[key] = v
    md.setdefault("ss_network_module", "networks.lora")
    md.setdefault("modelspec.sai_model_spec", "1.0.0")
    uniq = sorted(set(ranks))
    # alpha = rank per module (scale folded into lora_up), so dim and alpha agree; sd-scripts'
    # resize_lora writes "Dynamic" when ranks differ across modules.
    md["ss_network_dim"] = str(uniq[0]) if len(uniq) == 1 else "Dynamic"
    md["ss_network_alpha"] = md["ss_network_dim"]
    titles = [_title(a) for a in adapters]
    md["modelspec.title"] = f"{method} merge of {', '.join(titles)}" if len(titles) > 1 else f"{titles[0]} ({method})"
    md["modelspec.merged_from"] = ", ".join(titles)
    rec = {"tool": f"mergekit-lora {__version__}", "method": method,
           "sources": [{"title": t, "sshs_model_hash": a.meta.extra.get("data_sha256")} for t, a in zip(titles, adapters)]}
    rec.update(dict(recipe or {}))
    md["mergekit_lora.recipe"] = json.dumps(rec, sort_keys=True, default=str)
    return md
