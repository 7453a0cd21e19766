"""The unit pools of a batch of same-shape modules, held as Gram matrices (no copied factors).

A module's pool is every weighted rank unit of every input, as the vector v_i = [b_i ; a_i].  Units
are put in canonical form first: balanced (‖a_i‖ = ‖b_i‖), and a fixed sign when ``signs="rule"``
(with ``signs="invariant"`` k-means itself treats v and −v as the one unit they are).  Without the
balance the same direction appears at any split c·b, a/c, and k-means clusters those artefacts.

Everything LEGO needs — k-means distances, centroid norms, reweighting Grams, fidelity — is a
function of the two N×N Gram matrices GA = A Aᵀ and GB = BᵀB of the raw pooled factors, because
balancing and signs are diagonal scalings of them.  So a module costs two N²·d products; the
centroids are one k·N·d product at the end.

The pool is ordered by content (sort key: ‖v_i‖², then |⟨v_i, r⟩| for a seeded random r), so the
merge does not depend on the order of units or inputs for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mergekit_lora.units import RankUnits


@dataclass(frozen=True)
class PoolBatch:
    """M same-shape pools of N units.  Tensors in the input order unless said "sorted"."""

    A: torch.Tensor  # [M, N, d_in] weighted units, as pooled (input order)
    B: torch.Tensor  # [M, d_out, N]
    ca: torch.Tensor  # [M, N] canonical a'_i = ca_i a_i, b'_i = cb_i b_i (balance × sign; 0 for zero units)
    cb: torch.Tensor  # [M, N]
    order: torch.Tensor  # [M, N] sorted position -> input position
    KA: torch.Tensor  # [M, N, N] sorted canonical Grams a'_iᵀa'_j
    KB: torch.Tensor  # [M, N, N] b'_iᵀb'_j
    source: torch.Tensor  # [M, N] sorted input index of each unit (CPU)
    target_norm2: torch.Tensor  # [M] ‖Σ w_i ΔW_i‖² (float64, CPU)
    mean_rank: list[float]  # per module: the inputs' mean rank (the paper's output reweighting)
    template: list[RankUnits]  # per module: one input's units, the shape/kind carrier of the output

    @property
    def size(self) -> int:
        return int(self.A.shape[1])

    def K(self, space: str) -> torch.Tensor:
        """What k-means sees: the Gram of [b; a] (paper), or of the A-part / B-part only."""
        return {"a": self.KA, "b": self.KB}.get(space, self.KA + self.KB)

    def unsort(self, W: torch.Tensor) -> torch.Tensor:
        """Rows of W [M, N, k] from sorted positions back to input positions."""
        out = torch.empty_like(W)
        out.scatter_(1, self.order.to(W.device)[:, :, None].expand_as(W), W)
        return out


def pooled_dtype(units: list[RankUnits]) -> torch.dtype:
    """The dtype RankUnits.concat gives these units (the merged module's output dtype)."""
    dt = units[0].A.dtype
    for u in units:
        dt = torch.promote_types(dt, torch.promote_types(u.A.dtype, u.B.dtype))
    return dt


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The inputs' own precision, at least float32 (float64 inputs keep float64)."""
    return torch.promote_types(dtype, torch.float32)


def build_pools(units: list[list[RankUnits]], weights: list[list[float]], *, canonical: bool, signs: str,
                generators: list[torch.Generator], device: torch.device) -> PoolBatch:
    """Weight and pool each module's units, then the canonical sorted Grams (``generators``: sort keys)."""
    first = units[0][0]
    dt = work_dtype(pooled_dtype([u for us in units for u in us]))
    M, N, d_in, d_out = len(units), sum(u.rank for u in units[0]), first.d_in, first.d_out
    A = torch.empty(M, N, d_in, dtype=dt, device=device)
    B = torch.empty(M, d_out, N, dtype=dt, device=device)
    for m, (us, ws) in enumerate(zip(units, weights)):  # one copy of each factor into the batch
        at = 0
        for u, w in zip(us, ws):
            A[m, at:at + u.rank].copy_(u.A)
            torch.mul(u.B.to(dt), w, out=B[m, :, at:at + u.rank])  # in the work dtype, not the input
            at += u.rank
    GA = torch.bmm(A, A.transpose(1, 2))
    GB = torch.bmm(B.transpose(1, 2), B)
    na = torch.diagonal(GA, dim1=1, dim2=2).clamp_min(0).sqrt()
    nb = torch.diagonal(GB, dim1=1, dim2=2).clamp_min(0).sqrt()
    nonzero = (na > 0) & (nb > 0)
    if canonical:
        c = torch.where(nonzero, torch.sqrt(nb / torch.where(nonzero, na, 1)), torch.zeros_like(na))
    else:
        c = torch.where(nonzero, torch.ones_like(na), torch.zeros_like(na))
    sign = torch.ones_like(c)
    if canonical and signs == "rule":  # the largest-|entry| of a_i positive (first on ties)
        idx = A.abs().argmax(dim=2)
        sign = torch.sign(A.gather(2, idx[:, :, None])[:, :, 0])
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    ca = c * sign  # a'_i = ca_i a_i
    cb = torch.where(nonzero, sign / torch.where(nonzero, c, 1), torch.zeros_like(c))  # b'_i = cb_i b_i
    # content order: ‖v'‖² then |⟨v', r⟩| (sign-free), keys in float64 on the CPU
    r = torch.stack([torch.randn(d_out + d_in, generator=g, dtype=torch.float64) for g in generators])
    r = r.to(device=device, dtype=dt)
    proj = cb * torch.bmm(r[:, None, :d_out], B)[:, 0] + ca * torch.bmm(A, r[:, d_out:, None])[:, :, 0]
    norm2 = (ca**2 * na**2 + cb**2 * nb**2).double().cpu().numpy()
    absproj = proj.abs().double().cpu().numpy()
    order = torch.from_numpy(np.stack([np.lexsort((absproj[m], norm2[m])) for m in range(M)]).astype(np.int64))
    od = order.to(device)
    sa, sb = ca.gather(1, od), cb.gather(1, od)

    def sorted_gram(G: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        G = G.gather(1, od[:, :, None].expand(M, N, N)).gather(2, od[:, None, :].expand(M, N, N))
        return G * s[:, :, None] * s[:, None, :]

    source = torch.stack([torch.cat([u.source.cpu() for u in us]) for us in units]).gather(1, order)
    target_norm2 = (GA.double() * GB.double()).sum((1, 2)).clamp_min(0).cpu()
    mean_rank = [float(sum(u.rank for u in us)) / max(len(us), 1) for us in units]
    return PoolBatch(A, B, ca, cb, order, sorted_gram(GA, sa), sorted_gram(GB, sb), source, target_norm2,
                     mean_rank, [us[0] for us in units])
