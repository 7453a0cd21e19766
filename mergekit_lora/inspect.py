"""What is in an adapter: format, base, ranks, scales, sizes, ‖ΔW‖ per module group, unknown keys."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from .adapter import Adapter
from .formats import load_adapter
from .formats.portable import serving_warnings
from .formats.registry import inspect_sections
from .names import module_group


def inspect_adapter(source: str | Path | Adapter, *, norms: bool = True) -> dict[str, Any]:
    """A JSON-able report; ``norms`` loads each module once to compute ‖ΔW‖ in factor space."""
    a = source if isinstance(source, Adapter) else load_adapter(source, strict=False, ignore_modules_to_save=True)
    infos = list(a.modules.values())
    ranks = Counter(i.rank for i in infos)
    alphas = Counter(i.alpha for i in infos)
    scales = Counter(round(i.scale, 6) for i in infos)
    groups: dict[str, dict[str, Any]] = {}
    per_module = []
    for i in infos:
        g = groups.setdefault(module_group(i.name), {"modules": 0, "ranks": Counter(), "norm_sq": 0.0,
                                                     "shape": list(i.weight_shape)})
        g["modules"] += 1
        g["ranks"][i.rank] += 1
        row: dict[str, Any] = {"name": i.name, "rank": i.rank, "alpha": i.alpha, "scale": i.scale,
                               "kind": i.kind, "weight_shape": list(i.weight_shape), "dtype": str(i.dtype)}
        if norms:
            n = a.units(i.name).norm()
            g["norm_sq"] += n * n
            row["delta_norm"] = n
        per_module.append(row)
    cfg = a.meta.config
    report: dict[str, Any] = {
        "path": str(a.path) if a.path else a.label,
        "format": a.meta.format,
        "base_model": a.meta.base_model,
        "base_family": a.meta.extra.get("base_family"),
        "modules": len(infos),
        "rank": _summary(ranks),
        "alpha": _summary(alphas),
        "scale": _summary(scales),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "alpha_assumed": bool(a.meta.extra.get("alpha_assumed", False)),
        "dtype": str(a.meta.dtype).replace("torch.", ""),
        "parameters": a.num_params(),
        "target_modules": a.meta.target_modules,
        "groups": {
            k: {"modules": v["modules"], "rank": _summary(v["ranks"]), "weight_shape": v["shape"],
                **({"delta_norm": math.sqrt(v["norm_sq"])} if norms else {})}
            for k, v in groups.items()
        },
        "unknown_keys": a.unknown_keys,
        "dropped_modules_to_save": a.meta.extra.get("dropped_modules_to_save", []),
        "dropped_base_layers": a.meta.extra.get("dropped_base_layers", []),
        "per_module": per_module,
    }
    if a.meta.format == "peft":  # what vLLM / SGLang / LoRAX would refuse (--profile portable writes the subset)
        report["serving_warnings"] = serving_warnings(a)
    inspect_sections(a, report)
    return report


def _summary(c: Counter) -> dict[str, Any]:
    """{'uniform': v} when every module agrees, else {'min', 'max', 'counts'}."""
    if len(c) == 1:
        return {"uniform": next(iter(c))}
    keys = sorted(c)
    return {"min": keys[0], "max": keys[-1], "counts": {str(k): c[k] for k in keys}}
