"""Fidelity of a merged module against its target Σ w_i ΔW_i, in factor space (no dense ΔW)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .names import module_group
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


def weighted_target(units: list[RankUnits], weights: list[float]) -> RankUnits:
    """Σ w_i ΔW_i as rank units (exact, by concatenation)."""
    return RankUnits.concat([u.scaled(w) for u, w in zip(units, weights)])


def module_fidelity(name: str, merged: RankUnits, target: RankUnits) -> ModuleFidelity:
    merged = merged.to(device=target.A.device)
    m2, t2 = merged.norm_sq(), target.norm_sq()  # each Gram pair once (distance() would recompute both)
    e2 = max(m2 - 2 * merged.inner(target) + t2, 0.0)
    return ModuleFidelity(name, t2**0.5, m2**0.5, e2**0.5)


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
        out[key] = {
            "modules": n,
            "rel_error": (e2 / t2) ** 0.5 if t2 > 0 else 0.0,
            "energy_ratio": m2 / t2 if t2 > 0 else 0.0,
        }
    return out
