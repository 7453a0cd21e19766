"""The unit pool of one module: all weighted rank units of all inputs as vectors [b_i ; a_i].

Units are put in canonical form first (balanced ‖a_i‖ = ‖b_i‖, fixed sign): without it the same
direction appears at any scale split c·b, a/c and with either sign, and k-means clusters those
artefacts instead of directions.  The pool is then sorted into an order that depends only on its
contents (not on which input or rank slot a unit came from), so the merge is invariant to permuting
units or reordering inputs for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mergekit_lora.units import RankUnits


@dataclass(frozen=True)
class Pool:
    """One module's pool, sorted canonically.  ``V`` [N, d_out + d_in] = [b_i ; a_i] rows."""

    target: RankUnits  # Σ w_i ΔW_i as the (canonical, sorted) pooled units: exactly the weighted sum
    V: torch.Tensor
    source: torch.Tensor  # [N] input index of each unit
    mean_rank: float  # mean rank of the inputs (for the paper's output reweighting)

    @property
    def d_out(self) -> int:
        return self.target.d_out

    @property
    def size(self) -> int:
        return int(self.V.shape[0])

    def features(self, space: str) -> torch.Tensor:
        """What k-means sees: the whole vector (paper), or its A-part / B-part only."""
        if space == "a":
            return self.V[:, self.d_out:]
        if space == "b":
            return self.V[:, : self.d_out]
        return self.V


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 on CPU (exact enough for bit-stable tests), float32 on CUDA (speed)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def canonical_order(V: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """A permutation sorting rows by (‖v‖², ⟨v, direction⟩): a function of the rows' values only."""
    norm2 = (V * V).sum(1).double().cpu().numpy()
    proj = (V * direction[None, :]).sum(1).double().cpu().numpy()
    return torch.from_numpy(np.lexsort((proj, norm2)).astype(np.int64))


def build_pool(units: list[RankUnits], weights: list[float], *, canonical: bool, generator: torch.Generator,
               device: torch.device) -> Pool:
    """Weight, pool, canonicalise and sort the units of one module (``generator`` draws the sort key)."""
    target = RankUnits.concat([u.scaled(w) for u, w in zip(units, weights)])
    dt = work_dtype(device)
    target = target.to(device=device, dtype=dt)
    if canonical:
        target = target.canonical()
    V = torch.cat([target.B.T, target.A], 1)
    direction = torch.randn(V.shape[1], generator=generator, dtype=torch.float64).to(device=device, dtype=dt)
    perm = canonical_order(V, direction).to(device)
    target = target.permuted(perm)
    mean_rank = float(sum(u.rank for u in units)) / max(len(units), 1)
    return Pool(target, V[perm], target.source.cpu(), mean_rank)
