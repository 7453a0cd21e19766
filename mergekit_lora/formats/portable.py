"""The portable PEFT profile: the LoRA subset that multi-LoRA serving engines (vLLM, SGLang, LoRAX) load.

Those engines give every adapter one rank and one ``lora_alpha`` and refuse (or silently mis-read)
per-module ``rank_pattern``/``alpha_pattern``, mixed ranks, DoRA, ``modules_to_save`` and regex
``target_modules``.  :func:`pad_units` brings every module to one rank with zero units (ΔW unchanged),
:func:`portable_config` writes ``r = lora_alpha`` (scale 1, the scale being folded into B) and an explicit
``target_modules`` list, and :func:`serving_warnings` says what in an existing adapter these runtimes refuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..adapter import Adapter, AdapterMeta
from ..errors import LoraMergeError
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


def pad_units(u: RankUnits, rank: int) -> RankUnits:
    """``u`` with zero units appended up to ``rank`` (A [rank, d_in], B [d_out, rank]); ΔW is unchanged."""
    if u.kind == "conv":
        raise LoraMergeError("the portable profile is for language-model serving engines; conv modules "
                             "are not supported there (use the default profile)")
    extra = rank - u.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {u.rank} down to {rank}")
    if extra == 0:
        return u
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
    """What vLLM / SGLang / LoRAX refuse or mis-read in this adapter (empty: it is portable).

    One sentence each, naming the field; ``loramerge merge --profile portable`` writes the portable subset."""
    meta: AdapterMeta = adapter.meta
    cfg = meta.config or {}
    out: list[str] = []
    ranks = sorted({i.rank for i in adapter.modules.values()})
    if cfg.get("rank_pattern"):
        out.append(f"rank_pattern sets per-module ranks ({len(cfg['rank_pattern'])} entries); serving engines "
                   "take one rank per adapter")
    if cfg.get("alpha_pattern"):
        out.append(f"alpha_pattern sets per-module alphas ({len(cfg['alpha_pattern'])} entries); serving "
                   "engines take one lora_alpha per adapter")
    if len(ranks) > 1:
        out.append(f"modules have different ranks ({', '.join(map(str, ranks))}); serving engines need one "
                   "rank (the portable profile pads with zero units)")
    if cfg.get("use_dora"):
        out.append("use_dora is set; vLLM, SGLang and LoRAX do not load DoRA adapters")
    if cfg.get("use_rslora"):
        out.append("use_rslora is set; some serving engines ignore it and apply alpha/r instead of alpha/√r")
    if cfg.get("modules_to_save"):
        out.append("modules_to_save holds full weights; serving engines load LoRA factors only")
    if cfg.get("layers_to_transform") is not None or cfg.get("layers_pattern"):
        out.append("layers_to_transform/layers_pattern restrict layers; serving engines ignore them")
    if isinstance(cfg.get("target_modules", meta.target_modules), str):
        out.append("target_modules is a regular expression; serving engines expect a list of module names")
    if cfg.get("bias", "none") != "none":
        out.append(f"bias = {cfg['bias']!r} trains biases; serving engines load LoRA factors only")
    kinds = {i.kind for i in adapter.modules.values()}
    if "conv" in kinds:
        out.append("the adapter has conv modules; LLM serving engines load Linear (and Embedding) LoRAs only")
    if meta.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        out.append(f"weights are {str(meta.dtype).removeprefix('torch.')}; serving engines load float16/bfloat16")
    return out
