"""kohya / A1111 LoRA files: ``lora_unet_…`` / ``lora_te[123]_…`` + ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

Module names stay in kohya's own namespace (``lora_unet_down_blocks_0_…``): kohya flattens the
module path with ``_``, which cannot be inverted without the model, so two kohya files line up by
name directly.  Written files use ``alpha = rank`` for every module with the scale folded into
``lora_up``: reading gives scale 1 and the factors back bit for bit, so ΔW is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..adapter import Adapter
from ..arrays import Stored
from ..errors import LoraMergeError
from ..factor_arrays import ArrayUnits
from .request import WriteRequest
from .sd_common import Entry, Parsed, adapter_from_entries, factors
from .sd_detect import KOHYA_KEY, kohya_name, refuse_unknown, refuse_variants
from .sd_meta import canonical_bytes, file_data_sha256, kohya_hashes, kohya_metadata
from .tensors import TensorSource

if TYPE_CHECKING:
    from ..units import RankUnits

WEIGHTS_NAME = "lora.safetensors"


def parse_kohya(keys: Iterable[str]) -> Parsed:
    """Pure: kohya keys -> module name -> (down, up, alpha) keys, plus the keys not consumed."""
    entries: dict[str, Entry] = {}
    unconsumed: list[str] = []
    for k in keys:
        m = KOHYA_KEY.match(k)
        if m is None:
            unconsumed.append(k)
            continue
        e = entries.setdefault(m.group("mod"), Entry())
        part = m.group("part")
        if part == "alpha":
            e.alpha = k
        elif part.startswith("lora_down"):
            e.down = k
        else:
            e.up = k
    # a module with only an alpha scalar (a trainer artefact) holds no update: report it, do not invent one
    for name in [n for n, e in entries.items() if e.down is None and e.up is None]:
        unconsumed.append(entries.pop(name).alpha or name)
    return Parsed(entries, unconsumed)


def read_kohya(path: Path, *, allow_pickle: bool = False, strict: bool = True, **_: Any) -> Adapter:
    src = TensorSource.open(Path(path), allow_pickle=allow_pickle)
    refuse_variants(src.path, src.keys)
    parsed = parse_kohya(src.keys)
    if strict:
        refuse_unknown(src.path, parsed.unconsumed, "kohya")
    a = adapter_from_entries(src, parsed, fmt="kohya", naming="kohya", label=src.path.stem)
    if src.path.suffix == ".safetensors":
        a.meta.extra["data_sha256"] = file_data_sha256(src.path)
    return a


def kohya_tensors(name: str, u: RankUnits | ArrayUnits, dtype: Any) -> dict[str, Any]:
    """One module's keys: scale already in ``lora_up``, so ``alpha`` = rank (float32: exact for any rank).

    Torch tensors for :class:`RankUnits`, numpy :class:`~mergekit_lora.arrays.Stored` arrays for ArrayUnits."""
    down, up = factors(u, dtype)
    rank = float(down.shape[0])
    if isinstance(u, ArrayUnits):
        alpha: Any = Stored(np.array(rank, dtype=np.float32), "float32")
    else:
        import torch  # a RankUnits' tensors: torch is already imported

        alpha = torch.tensor(rank, dtype=torch.float32)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}


def to_kohya_names(names: Sequence[str]) -> dict[str, str]:
    """Module name -> kohya name: kohya names pass through, diffusers paths map deterministically."""
    sdxl = any(n.startswith(("text_encoder_2.", "lora_te1_", "lora_te2_")) for n in names)
    out = {n: (n if n.startswith(("lora_", "lycoris_")) else kohya_name(n, sdxl=sdxl)) for n in names}
    if len(set(out.values())) != len(out):
        raise LoraMergeError("two modules map to the same kohya name; write with «output_format» diffusers instead")
    return out


def write_kohya(req: WriteRequest) -> dict[str, Any]:
    """Write ``lora.safetensors`` with kohya keys and metadata into ``req.out_dir``; returns the header metadata.

    ``req.modules`` hold ``RankUnits`` or numpy ``ArrayUnits`` (a torch-free merge)."""
    dtype = req.dtype
    mods = list(req.modules)
    names = to_kohya_names([n for n, _ in mods])
    tensors: dict[str, Any] = {}
    ranks = []
    for name, u in mods:
        t = kohya_tensors(names[name], u, dtype)
        tensors.update(t)
        ranks.append(int(t[f"{names[name]}.lora_down.weight"].shape[0]))
    md = kohya_metadata(req.adapters, ranks, method=req.method, recipe=req.recipe)
    md.update(kohya_hashes(tensors, md))
    (Path(req.out_dir) / WEIGHTS_NAME).write_bytes(canonical_bytes(tensors, md))
    return md
