"""The portable PEFT profile: the LoRA subset that multi-LoRA serving engines (vLLM, SGLang, LoRAX) load.

Those engines give every adapter one rank and one ``lora_alpha`` and refuse (or silently mis-read)
per-module ``rank_pattern``/``alpha_pattern``, mixed ranks, DoRA, ``modules_to_save`` and regex
``target_modules``.  :func:`pad_units` brings every module to one rank with zero units (ΔW unchanged),
:func:`portable_config` writes ``r = lora_alpha`` (scale 1, the scale being folded into B) and an explicit
``target_modules`` list, and :func:`serving_warnings` says what in an existing adapter these runtimes refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..adapter import Adapter, AdapterMeta
from ..errors import LoraMergeError
from ..factor_arrays import ArrayUnits
from .serving import serving_warnings_for

if TYPE_CHECKING:
    from ..units import RankUnits

PROFILES = ("default", "portable")
# Keys the portable config leaves out (PEFT's defaults then apply: no patterns, no rsLoRA, no DoRA).
REFUSED_KEYS = ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "layers_to_transform",
                "layers_pattern", "modules_to_save")


def check_profile(profile: str | None) -> str:
    p = profile or "default"
    if p not in PROFILES:
        raise LoraMergeError(f"output profile {profile!r} is not known; use one of: {', '.join(PROFILES)}")
    return p


def pad_units(u: RankUnits | ArrayUnits, rank: int) -> RankUnits | ArrayUnits:
    """``u`` with zero units appended up to ``rank`` (A [rank, d_in], B [d_out, rank]); ΔW is unchanged."""
    if u.kind == "conv":
        raise LoraMergeError("the portable profile is for language-model serving engines; conv modules "
                             "are not supported there (use the default profile)")
    extra = rank - u.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {u.rank} down to {rank}")
    if extra == 0:
        return u
    if isinstance(u, ArrayUnits):
        return u.with_factors(np.concatenate([u.A, np.zeros((extra, u.d_in), u.A.dtype)]),
                              np.concatenate([u.B, np.zeros((u.d_out, extra), u.B.dtype)], axis=1),
                              np.concatenate([u.source, np.zeros(extra, u.source.dtype)]))
    import torch  # a RankUnits' tensors: torch is already imported

    A = torch.cat([u.A, torch.zeros(extra, u.d_in, dtype=u.A.dtype, device=u.A.device)])
    B = torch.cat([u.B, torch.zeros(u.d_out, extra, dtype=u.B.dtype, device=u.B.device)], dim=1)
    src = torch.cat([u.source, torch.zeros(extra, dtype=u.source.dtype)])
    return u.with_factors(A, B, src)


def padded(modules: Iterable[tuple[str, RankUnits]], rank: int | None = None
           ) -> tuple[list[tuple[str, RankUnits]], int, int]:
    """All modules padded to one rank (``rank``, else the largest, at least 1).

    Returns (modules, rank, added parameters).  The modules are collected first when ``rank`` is not
    given (the largest rank is only known at the end)."""
    items = list(modules)
    top = max([u.rank for _, u in items] + [1])
    if rank is None:
        rank = top
    elif rank < top:
        raise LoraMergeError(f"portable rank {rank} is below the adapter's largest module rank {top}")
    added = sum((rank - u.rank) * (u.d_in + u.d_out) for _, u in items)
    return [(n, pad_units(u, rank)) for n, u in items], rank, added


def short_target_modules(names: Iterable[str]) -> list[str]:
    """Explicit ``target_modules``: the modules' last name parts (``q_proj``), the form serving engines map."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def portable_config(cfg: dict[str, Any], rank: int, names: Iterable[str]) -> dict[str, Any]:
    """A default-profile PEFT config rewritten to the portable subset (one rank, lora_alpha = r)."""
    out = {k: v for k, v in cfg.items() if k not in REFUSED_KEYS}
    out.update(r=int(rank), lora_alpha=int(rank), target_modules=short_target_modules(names))
    return out


def serving_warnings(adapter: Adapter) -> list[str]:
    """What vLLM / SGLang / LoRAX refuse or mis-read in this adapter (empty: it is portable); see
    :func:`~mergekit_lora.formats.serving.serving_warnings_for`."""
    meta: AdapterMeta = adapter.meta
    infos = adapter.modules.values()
    return serving_warnings_for(meta.config or {}, meta.target_modules, [i.rank for i in infos],
                                [i.kind for i in infos], str(meta.dtype).removeprefix("torch."))
