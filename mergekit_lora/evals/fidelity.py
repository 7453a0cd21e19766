"""Fidelity of a merged adapter against its inputs, in factor space (never a dense ΔW).

Per module and overall:
- relative error ‖ΔW_merged − Σ wᵢ ΔWᵢ‖ / ‖Σ wᵢ ΔWᵢ‖ and energy retained ‖ΔW_merged‖² / ‖Σ wᵢ ΔWᵢ‖²
  (the core's :mod:`mergekit_lora.fidelity`, shared with the merge driver and the model card);
- per input i: cos(ΔW_merged, ΔWᵢ) and the projection ratio ⟨ΔW_merged, ΔWᵢ⟩ / ‖ΔWᵢ‖² (1 means
  input i's direction is kept at full strength, like a weight-1 sum of orthogonal updates);
- effective rank exp(H(σ/Σσ)) of ΔW_merged (Roy & Vetterli), from its singular values in factor space.

"Overall" treats the whole adapter as one vector (all modules concatenated): sums of squared norms
and inner products over modules, so large modules weigh more; the effective rank is the mean.
A module missing from an adapter counts as ΔW = 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mergekit_lora.adapter import Adapter
from mergekit_lora.checks import weight_count
from mergekit_lora.fidelity import ModuleFidelity, module_fidelity, summarize, weighted_target
from mergekit_lora.formats import load_adapter
from mergekit_lora.lowrank import singular_values
from mergekit_lora.units import RankUnits


def effective_rank(s: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (0 for ΔW = 0)."""
    s = s[s > 0].double()
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


@dataclass
class ModuleRow:
    name: str
    rank: int
    rel_error: float
    energy: float
    effective_rank: float
    cos: list[float]
    projection: list[float]
    # the sums the overall numbers are built from
    target_sq: float = 0.0
    merged_sq: float = 0.0
    error_sq: float = 0.0
    inner: list[float] = field(default_factory=list)
    input_sq: list[float] = field(default_factory=list)


@dataclass
class FidelityReport:
    inputs: list[str]
    weights: list[float]
    modules: list[ModuleRow]
    overall: dict[str, object]
    groups: dict[str, dict[str, float]]

    def as_dict(self, per_module: bool = True) -> dict[str, object]:
        d = {"inputs": self.inputs, "weights": self.weights, "overall": self.overall, "groups": self.groups}
        if per_module:
            d["modules"] = [{k: v for k, v in asdict(m).items()
                             if k not in ("target_sq", "merged_sq", "error_sq", "inner", "input_sq")}
                            for m in self.modules]
        return d


def _zero_like(u: RankUnits) -> RankUnits:
    return u.with_factors(u.A[:0], u.B[:, :0], torch.zeros(0, dtype=torch.long))


def module_row(name: str, merged: RankUnits | None, inputs: Sequence[RankUnits | None],
               weights: Sequence[float]) -> ModuleRow:
    """All metrics of one module; ``None`` stands for an adapter without this module (ΔW = 0)."""
    ref = merged if merged is not None else next(u for u in inputs if u is not None)
    zero = _zero_like(ref.to(dtype=torch.float64))
    m = merged if merged is not None else zero
    units = [u if u is not None else zero for u in inputs]
    target = weighted_target(units, list(weights))
    fid = module_fidelity(name, m, target)
    inner = [m.inner(u) for u in units]
    input_sq = [u.norm_sq() for u in units]
    merged_sq = fid.merged_norm**2
    cos = [_ratio(i, math.sqrt(merged_sq * s)) if merged_sq * s > 0 else 0.0 for i, s in zip(inner, input_sq)]
    proj = [_ratio(i, s) for i, s in zip(inner, input_sq)]
    return ModuleRow(name, m.rank, fid.rel_error, _ratio(merged_sq, fid.target_norm**2),
                     effective_rank(singular_values(m)) if m.rank else 0.0, cos, proj,
                     fid.target_norm**2, merged_sq, fid.error_norm**2, inner, input_sq)


def _load(a: str | Path | Adapter) -> Adapter:
    return a if isinstance(a, Adapter) else load_adapter(a)


def fidelity_report(merged: str | Path | Adapter, inputs: Sequence[str | Path | Adapter],
                    weights: Sequence[float] | None = None) -> FidelityReport:
    """Compare ``merged`` with Σ wᵢ ΔWᵢ of ``inputs``, one module at a time (default weights: 1)."""
    mad = _load(merged)
    ins = [_load(a) for a in inputs]
    weight_count(weights, len(ins))
    w = [float(x) for x in weights] if weights is not None else [1.0] * len(ins)
    names = list(dict.fromkeys([*mad.module_names(), *(n for a in ins for n in a.module_names())]))
    rows = []
    for name in names:
        m = mad.units(name) if name in mad else None
        us = [a.units(name) if name in a else None for a in ins]
        rows.append(module_row(name, m, us, w))
    t2 = sum(r.target_sq for r in rows)
    m2 = sum(r.merged_sq for r in rows)
    e2 = sum(r.error_sq for r in rows)
    inner = [sum(r.inner[i] for r in rows) for i in range(len(ins))]
    in2 = [sum(r.input_sq[i] for r in rows) for i in range(len(ins))]
    overall: dict[str, object] = {
        "modules": len(rows),
        "rel_error": math.sqrt(_ratio(e2, t2)) if t2 > 0 else (0.0 if e2 == 0 else math.inf),
        "energy": _ratio(m2, t2),
        "effective_rank": sum(r.effective_rank for r in rows) / len(rows) if rows else 0.0,
        "cos": [_ratio(i, math.sqrt(m2 * s)) if m2 * s > 0 else 0.0 for i, s in zip(inner, in2)],
        "projection": [_ratio(i, s) for i, s in zip(inner, in2)],
    }
    groups = summarize(ModuleFidelity(r.name, math.sqrt(r.target_sq), math.sqrt(r.merged_sq),
                                      math.sqrt(r.error_sq)) for r in rows)
    groups.pop("overall", None)
    labels = [a.label if isinstance(a, Adapter) else str(a) for a in inputs]
    return FidelityReport(labels, w, rows, overall, groups)
