"""What multi-LoRA serving engines (vLLM, SGLang, LoRAX) refuse in an adapter, from its config and header.

No torch: ``loramerge inspect`` reports these for a PEFT adapter it reads from headers alone; the
portable profile (:mod:`.portable`) writes the subset they load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def serving_warnings_for(cfg: dict[str, Any], target_modules: Any, module_ranks: Iterable[int],
                         module_kinds: Iterable[str], dtype: str) -> list[str]:
    """What vLLM / SGLang / LoRAX refuse or mis-read in an adapter (empty: it is portable), from its PEFT
    config, ``target_modules``, per-module ranks and kinds and its dtype name (``"float32"``).

    One sentence each, naming the field; ``loramerge merge --profile portable`` writes the portable subset."""
    out: list[str] = []
    ranks = sorted(set(module_ranks))
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
    if isinstance(cfg.get("target_modules", target_modules), str):
        out.append("target_modules is a regular expression; serving engines expect a list of module names")
    if cfg.get("bias", "none") != "none":
        out.append(f"bias = {cfg['bias']!r} trains biases; serving engines load LoRA factors only")
    if "conv" in set(module_kinds):
        out.append("the adapter has conv modules; LLM serving engines load Linear (and Embedding) LoRAs only")
    if dtype not in ("float16", "bfloat16", "float32"):
        out.append(f"weights are {dtype}; serving engines load float16/bfloat16")
    return out
