"""What is in an adapter: format, base, ranks, scales, sizes, ‖ΔW‖ per module group, unknown keys.

A local PEFT folder with ``adapter_model.safetensors`` (the common case) is read without torch: its
header and config give the layout (:mod:`.formats.peft_layout`, the reader's own parser) and each
module's ‖ΔW‖ comes from its factors as numpy arrays.  Every other source (kohya, diffusers, routed,
a lone file, a pickle, a Hub id, an :class:`Adapter` object) goes through :func:`load_adapter` and the
formats' inspect hooks; its norms come from numpy factors too where the reader gives them (safetensors
files), so only pickles, routed adapters and in-memory adapters import torch.  Both give the same
:class:`Contents` to one report builder.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import LoraMergeError
from .formats.peft_layout import has_peft_keys, is_peft_folder, locate, peft_layout, read_config
from .formats.safetensors_header import DTYPE_NAMES, SafetensorsHeader
from .formats.serving import serving_warnings_for
from .names import module_group
from .paths import path_fits
from .sources import check_sources, refuse_gguf

if TYPE_CHECKING:
    from .adapter import Adapter


@dataclass(frozen=True)
class ModuleRow:
    """One module as the report shows it (``dtype``: ``"float32"``, ``"bfloat16"``, …)."""

    name: str
    rank: int
    alpha: float
    scale: float
    kind: str
    weight_shape: tuple[int, ...]
    dtype: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class Contents:
    """What the report is built from, however the adapter was read; ``norm(name)`` is ‖ΔW‖_F of one module."""

    path: str
    format: str
    base_model: str | None
    base_family: str | None
    config: dict[str, Any]
    alpha_assumed: bool
    dtype: str
    target_modules: Any
    unknown_keys: list[str]
    dropped_modules_to_save: list[str]
    dropped_base_layers: list[str]
    modules: list[ModuleRow]
    norm: Callable[[str], float]


def inspect_adapter(source: str | Path | Adapter, *, norms: bool = True) -> dict[str, Any]:
    """A JSON-able report; ``norms`` loads each module once to compute ‖ΔW‖ in factor space."""
    if isinstance(source, (str, Path)):
        path_fits(source)  # issue 28: a name over 255 bytes is one sentence, not an OSError
        check_sources([source])  # before torch: a typo answers at once, with a suggestion
        refuse_gguf(Path(source))
        if is_peft_safetensors(Path(source)) or _peft_file(Path(source)):
            return build_report(peft_contents(Path(source)), norms)
    # lazily: torch and every format's reader, for the sources the header path does not cover
    from .formats import load_adapter
    from .formats.registry import inspect_sections

    a = source if not isinstance(source, (str, Path)) else load_adapter(source, strict=False,
                                                                         ignore_modules_to_save=True)
    report = build_report(adapter_contents(a), norms)
    inspect_sections(a, report)
    return report


def is_peft_safetensors(path: Path) -> bool:
    """A local PEFT folder whose weights are ``adapter_model.safetensors`` (what ``load_adapter`` reads as PEFT)."""
    return is_peft_folder(path) and (path / "adapter_model.safetensors").is_file()


def _peft_file(path: Path) -> bool:
    """A local ``.safetensors`` file with PEFT keys (e.g. DIR/adapter_model.safetensors): read without torch too."""
    if not (path.suffix == ".safetensors" and path.is_file()):
        return False
    try:
        keys = SafetensorsHeader.open(path).keys
    except LoraMergeError:
        return False  # the full reader says what is wrong
    # PEFT saves every key under base_model.model.; anything else (diffusers, routed …) takes the full reader
    return bool(keys) and all(k.startswith("base_model.model.") for k in keys) and has_peft_keys(keys)


def peft_contents(folder: Path) -> Contents:
    """A PEFT folder's contents from its header and config; ‖ΔW‖ from numpy factors (no torch)."""
    weights, config_path = locate(folder, allow_pickle=False)
    config = read_config(config_path) if config_path else {}
    header = SafetensorsHeader.open(weights)
    layout = peft_layout(header, config, ignore_modules_to_save=True, strict=False)
    rows = [ModuleRow(m.name, m.rank, m.alpha, m.scale, m.kind, m.weight_shape,
                      DTYPE_NAMES[header.dtype_name(m.a_key)], m.d_in, m.d_out) for m in layout.modules.values()]

    def norm(name: str) -> float:
        m = layout.modules[name]
        return factor_norm(header.array(m.a_key), header.array(m.b_key), m.scale)

    return Contents(str(weights), "peft", config.get("base_model_name_or_path"), None, dict(config),
                    layout.alpha_assumed, rows[0].dtype, config.get("target_modules"), layout.unknown_keys,
                    layout.saved_modules, layout.base_layers, rows, norm)


def adapter_contents(a: Adapter) -> Contents:
    """A loaded adapter's contents; ‖ΔW‖ from its numpy factors when it has them, else its rank units."""
    rows = [ModuleRow(i.name, i.rank, i.alpha, i.scale, i.kind, i.weight_shape,
                      str(i.dtype).removeprefix("torch."), i.d_in, i.d_out) for i in a.modules.values()]
    extra = a.meta.extra
    return Contents(str(a.path) if a.path else a.label, a.meta.format, a.meta.base_model, extra.get("base_family"),
                    a.meta.config, bool(extra.get("alpha_assumed", False)), str(a.meta.dtype).replace("torch.", ""),
                    a.meta.target_modules, a.unknown_keys, extra.get("dropped_modules_to_save", []),
                    extra.get("dropped_base_layers", []), rows,
                    (lambda name: a.arrays(name).norm()) if a.has_arrays else (lambda name: a.units(name).norm()))


def factor_norm(A: np.ndarray, B: np.ndarray, scale: float) -> float:
    """‖scale · B A‖_F = sqrt(tr(BᵀB · AAᵀ)) in float64, without forming ΔW; ``A`` [r, …], ``B`` [d_out, r, …].

    The scale is applied to B in the factors' precision first, as :meth:`RankUnits.from_factors` does,
    so the value is the one the torch path computes."""
    r = A.shape[0]
    A2 = A.reshape(r, -1)
    B2 = B.reshape(B.shape[0], r)
    with np.errstate(over="ignore", invalid="ignore"):  # extreme factors: inf/nan in the table, no warnings
        if scale != 1.0:
            B2 = B2 * B2.dtype.type(scale)
        a64, b64 = A2.astype(np.float64), B2.astype(np.float64)
        n2 = float(((b64.T @ b64) * (a64 @ a64.T)).sum())
    return float(max(n2, 0.0) ** 0.5) if n2 == n2 else n2


def build_report(c: Contents, norms: bool) -> dict[str, Any]:
    """The JSON-able report of :func:`inspect_adapter` (without the formats' own sections)."""
    ranks = Counter(m.rank for m in c.modules)
    alphas = Counter(m.alpha for m in c.modules)
    scales = Counter(round(m.scale, 6) for m in c.modules)
    groups: dict[str, dict[str, Any]] = {}
    per_module = []
    for m in c.modules:
        g = groups.setdefault(module_group(m.name), {"modules": 0, "ranks": Counter(), "norm_sq": 0.0,
                                                     "shape": list(m.weight_shape)})
        g["modules"] += 1
        g["ranks"][m.rank] += 1
        row: dict[str, Any] = {"name": m.name, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
                               "kind": m.kind, "weight_shape": list(m.weight_shape), "dtype": m.dtype}
        if norms:
            n = c.norm(m.name)
            g["norm_sq"] += n * n
            row["delta_norm"] = n
        per_module.append(row)
    report: dict[str, Any] = {
        "path": c.path,
        "format": c.format,
        "base_model": c.base_model,
        "base_family": c.base_family,
        "modules": len(c.modules),
        "rank": _summary(ranks),
        "alpha": _summary(alphas),
        "scale": _summary(scales),
        "use_rslora": bool(c.config.get("use_rslora", False)),
        "alpha_assumed": c.alpha_assumed,
        "dtype": c.dtype,
        "parameters": sum(m.rank * (m.d_in + m.d_out) for m in c.modules),
        "target_modules": c.target_modules,
        "groups": {
            k: {"modules": v["modules"], "rank": _summary(v["ranks"]), "weight_shape": v["shape"],
                **({"delta_norm": math.sqrt(v["norm_sq"])} if norms else {})}
            for k, v in groups.items()
        },
        "unknown_keys": c.unknown_keys,
        "dropped_modules_to_save": c.dropped_modules_to_save,
        "dropped_base_layers": c.dropped_base_layers,
        "per_module": per_module,
    }
    if c.format == "peft":  # what vLLM / SGLang / LoRAX would refuse (--profile portable writes the subset)
        report["serving_warnings"] = serving_warnings_for(c.config, c.target_modules, ranks, [m.kind for m in c.modules],
                                                          c.dtype)
    return report


def _summary(c: Counter) -> dict[str, Any]:
    """{'uniform': v} when every module agrees, else {'min', 'max', 'counts'}."""
    if len(c) == 1:
        return {"uniform": next(iter(c))}
    keys = sorted(c)
    return {"min": keys[0], "max": keys[-1], "counts": {str(k): c[k] for k in keys}}
