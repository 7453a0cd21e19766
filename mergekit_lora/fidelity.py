"""Fidelity of a merged module against its target Σ w_i ΔW_i, in factor space (no dense ΔW)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .names import module_group

if TYPE_CHECKING:
    import torch

    from .units import RankUnits


@dataclass(frozen=True)
class ModuleFidelity:
    name: str
    target_norm: float
    merged_norm: float
    error_norm: float

    @property
    def rel_error(self) -> float:
        if self.target_norm == 0:
            return 0.0 if self.error_norm == 0 else float("inf")
        return self.error_norm / self.target_norm


def weighted_target(units: list[Any], weights: list[float]) -> Any:
    """Σ w_i ΔW_i as rank units (exact, by concatenation; RankUnits or numpy ArrayUnits alike)."""
    return type(units[0]).concat([u.scaled(w) for u, w in zip(units, weights)])


# module_fidelity first works in the inputs' precision (float32 Grams); when the error it finds is below
# this fraction of ‖target‖ + ‖merged‖ — where float32 cancellation in m² − 2⟨m,t⟩ + t² (~1e-7 of the
# norms², i.e. an error resolution of ~3e-4 of the norms) would matter — it recomputes in float64.
# Tolerance: a reported rel. error ≥ 3e-2 is accurate to ≤ 1e-3 relative; smaller ones are float64.
FLOAT32_MIN_REL_ERROR = 3e-2


def _grams(x: RankUnits, y: RankUnits, dtype: torch.dtype) -> float:
    """⟨ΔW_x, ΔW_y⟩_F = Σ (B_xᵀB_y) ⊙ (A_x A_yᵀ), products in ``dtype``, the final sum in float64."""
    import torch  # lazily: see module_fidelity

    bb = x.B.to(dtype).T @ y.B.to(dtype)
    aa = x.A.to(dtype) @ y.A.to(dtype).T
    return float((bb * aa).sum(dtype=torch.float64))


def module_fidelity(name: str, merged: RankUnits, target: RankUnits) -> ModuleFidelity:
    """‖merged − target‖, ‖target‖, ‖merged‖ in factor space (no dense ΔW); see FLOAT32_MIN_REL_ERROR."""
    import torch  # lazily: exact methods' rows (exact_fidelity) and summaries need no torch

    from .threads import single_thread

    merged = merged.to(device=target.A.device)
    with single_thread():  # r×r products: never worth threads; same bits whatever the budget
        for dtype in (torch.float32, torch.float64):
            if dtype == torch.float32 and torch.float64 in (merged.A.dtype, merged.B.dtype, target.A.dtype,
                                                            target.B.dtype):
                continue
            m2, t2 = max(_grams(merged, merged, dtype), 0.0), max(_grams(target, target, dtype), 0.0)
            e2 = max(m2 - 2 * _grams(merged, target, dtype) + t2, 0.0)
            if dtype == torch.float64 or e2 >= (FLOAT32_MIN_REL_ERROR * (m2**0.5 + t2**0.5)) ** 2:
                break
    return ModuleFidelity(name, t2**0.5, m2**0.5, e2**0.5)


def exact_fidelity(name: str, target: RankUnits) -> ModuleFidelity:
    """The row of an exact method (merged ΔW = target by construction): error 0, nothing computed.

    The norms are NaN ("not measured"): ‖Σ w_i ΔW_i‖ needs the N×N Gram of all N input units, which
    grows with the square of the number of inputs; :func:`summarize` reports rel. error 0 and energy
    ratio 1 for groups made only of exact rows.
    """
    return ModuleFidelity(name, math.nan, math.nan, 0.0)


def summarize(rows: Iterable[ModuleFidelity]) -> dict[str, dict[str, float]]:
    """Per group and overall: rel. error = sqrt(Σ err²)/sqrt(Σ target²), energy ratio Σ merged²/Σ target²."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        for key in (module_group(r.name), "overall"):
            a = acc.setdefault(key, [0.0, 0.0, 0.0, 0])
            a[0] += r.error_norm**2
            a[1] += r.target_norm**2
            a[2] += r.merged_norm**2
            a[3] += 1
    out = {}
    if "overall" in acc:
        acc["overall"] = acc.pop("overall")  # last row
    for key, (e2, t2, m2, n) in acc.items():
        if math.isnan(t2) and e2 == 0:  # only exact rows (norms not measured) and zero errors
            out[key] = {"modules": n, "rel_error": 0.0, "energy_ratio": 1.0}
            continue
        out[key] = {
            "modules": n,
            "rel_error": (e2 / t2) ** 0.5 if t2 > 0 else (math.nan if math.isnan(t2) else 0.0),
            "energy_ratio": m2 / t2 if t2 > 0 else (math.nan if math.isnan(t2) else 0.0),
        }
    return out
