"""The unit pools of a batch of same-shape modules, held as Gram matrices (no copied factors).

A module's pool is every rank unit of every input: unit i of input t is b_i a_iᵀ with b_i scaled by
the input's *relative* weight ω_t = n·w_t / Σ_s |w_s| (n inputs; equal weights of any size give
ω = 1, the published unweighted pool, so weights never shrink the update on top of the cluster means).
The merge approximates the weighted average T = (1/n) Σ_i ω_i b_i a_iᵀ = Σ_t w_t ΔW_t / Σ_t |w_t|.

Two vector forms per unit (``features``):

- ``paper`` (the published method): k-means sees f_i = [a_i/‖a_i‖ ; b_i/‖b_i‖] (each half unit-norm),
  the centroids average the raw vectors u_i = [a_i ; b_i];
- ``canonical``: both are the balanced u_i = [c_i a_i ; b_i / c_i] with ‖c_i a_i‖ = ‖b_i / c_i‖
  (without the balance the same direction appears at any split c·b, a/c);
- ``raw``: both are the raw [a_i ; b_i] (ablation: k-means then clusters scale splits).

Signs (``signs``): ``rule`` flips each unit so its largest-|·| a-entry is positive; ``invariant`` is left
to k-means (v and −v are one point); ``none`` keeps the stored signs (the published method).

Everything but the final centroids is a function of the N×N Gram matrices GA = A Aᵀ and GB = BᵀB of
the pooled factors, because normalising, balancing and signs are diagonal scalings of them: a module
costs two N²·d products.  The centroids are one k·N·d product at the end.  The sort keys ⟨u_i, r⟩ and
the parameter reweighting's max-abs norms of the members are taken from each input factor while it is
copied into the pool (in cache), not in passes over the pool.

The pool is ordered by content (sort key: ‖u_i‖², then |⟨u_i, r⟩| for a seeded random r), so the
merge does not depend on the order of units or inputs for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
import torch

from mergekit_lora.threads import NO_BUDGET, ThreadBudget, Workspace, matmul_rows_into, run_pool, uses_blocks
from mergekit_lora.units import RankUnits, balance_scale, sign_rule

if TYPE_CHECKING:  # read.py builds on this module's pool layout
    from .read import PoolBuffers


@dataclass(frozen=True)
class PoolBatch:
    """M same-shape pools of N units.  Tensors in the input order unless said "sorted"."""

    A: torch.Tensor  # [M, N, d_in] pooled units (input order)
    B: torch.Tensor  # [M, d_out, N] pooled units, b_i × ω (input order)
    ca: torch.Tensor  # [M, N] averaged vector u_i = [ca_i a_i ; cb_i b_i] (balance × sign; 0: zero unit)
    cb: torch.Tensor  # [M, N]
    order: torch.Tensor  # [M, N] sorted position -> input position
    KA: torch.Tensor  # [M, N, N] sorted Grams of the averaged vectors' halves: (ca_i a_i)ᵀ(ca_j a_j)
    KB: torch.Tensor  # [M, N, N] (cb_i b_i)ᵀ(cb_j b_j)
    FA: torch.Tensor  # [M, N, N] sorted Grams of k-means' features (A-half); KA itself unless paper
    FB: torch.Tensor  # [M, N, N] (B-half)
    linf: torch.Tensor  # [M, N] sorted ‖u_i‖_∞ (float64, CPU): the members' max-abs norms
    source: torch.Tensor  # [M, N] sorted input index of each unit (CPU)
    target_norm2: torch.Tensor  # [M] ‖T‖² of the weighted average T (float64, CPU)
    target_scale: list[float]  # per module: T = target_scale × Σ_i (pooled unit i), i.e. 1/n
    mean_rank: list[float]  # per module: the inputs' mean rank (the paper's output reweighting)
    template: list[RankUnits]  # per module: one input's units, the shape/kind carrier of the output

    @property
    def size(self) -> int:
        return int(self.A.shape[1])

    def K(self, space: str) -> torch.Tensor:
        """What k-means sees: the feature Gram of the whole vector, or of its A-half / B-half only."""
        return {"a": self.FA, "b": self.FB}.get(space, self.FA + self.FB)

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


def relative_weights(weights: Sequence[float]) -> list[float]:
    """ω_t = n·w_t / Σ_s |w_s| (mean |ω| = 1); all-zero weights give ω = 0 (an all-zero merge)."""
    total = sum(abs(float(w)) for w in weights)
    return [len(weights) * float(w) / total if total > 0 else 0.0 for w in weights]


def _inv(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """1/x where ``ok``, else 0."""
    return torch.where(ok, 1 / torch.where(ok, x, 1), torch.zeros_like(x))


def max_abs_columns(X: torch.Tensor) -> torch.Tensor:
    """max_i |X_ij| per column of X [d, r] (exact), without the slow reduction over a 16-wide matrix:
    g row-groups side by side make one [d/g, g·r] max and min pass (no |X| temporary)."""
    g = math.gcd(X.shape[0], 8)
    X2 = X.reshape(-1, g * X.shape[1])
    return torch.maximum(X2.amin(0).neg_(), X2.amax(0)).reshape(g, -1).amax(0).abs_()  # abs: ±0 gives +0


def pool_views(flat: torch.Tensor, M: int, N: int, d_in: int, d_out: int) -> tuple[torch.Tensor, ...]:
    """The batch pool in a flat buffer of :func:`pool_numel` entries: factors A [M, N, d_in], B [M, d_out, N],
    and ``amax``, ``bmax`` [M, N]: the row max-abs of A and column max-abs of B as :func:`read_pools` read them."""
    a, b = M * N * d_in, M * N * (d_in + d_out)
    assert flat.numel() == pool_numel(M, N, d_in, d_out)
    return flat[:a].view(M, N, d_in), flat[a:b].view(M, d_out, N), flat[b:b + M * N].view(M, N), flat[b + M * N:].view(M, N)


def pool_numel(M: int, N: int, d_in: int, d_out: int) -> int:
    return M * N * (d_in + d_out + 2)


def sort_vectors(generators: list[torch.Generator], n: int, dt: torch.dtype, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """The pool order's random vectors r [M, n]: float64 from each module's seeded generator, in ``dt``."""
    return torch.stack([torch.randn(n, generator=g, dtype=torch.float64) for g in generators]).to(device=device, dtype=dt)


def _in_slot(X: torch.Tensor, slot: torch.Tensor) -> bool:
    """Whether X is that very view of the pool (read in place by :func:`read_pools`)."""
    return X.data_ptr() == slot.data_ptr() and X.shape == slot.shape and X.stride() == slot.stride()


def build_pools(units: list[list[RankUnits]], weights: list[list[float]], *, features: str, signs: str,
                generators: list[torch.Generator], device: torch.device, workspace: Workspace | None = None,
                threads: ThreadBudget = NO_BUDGET, buffers: PoolBuffers | None = None) -> PoolBatch:
    """Weight and pool each module's units, then the sorted Grams (``generators``: sort keys).

    One pass over the inputs: each factor is copied into the batch pool (where :func:`read_pools` read the
    units, a buffer of ``buffers``; else ``workspace``'s buffer when given: the pool is then valid until the
    next call with it) and, while it is in cache, gives its
    sort-key projections, max-abs norms and sign-rule signs; the N×N Grams are then the only other
    pass over the pool before the centroids."""
    first = units[0][0]
    dt = work_dtype(pooled_dtype([u for us in units for u in us]))
    M, N, d_in, d_out = len(units), sum(u.rank for u in units[0]), first.d_in, first.d_out
    numel = pool_numel(M, N, d_in, d_out)
    flat = buffers.holder(first.A) if buffers is not None else None
    if flat is None or flat.dtype != dt or flat.numel() < numel or flat.device != torch.device(device):
        flat = workspace.buffer(numel, dt, device) if workspace else torch.empty(numel, dtype=dt, device=device)
    A, B, amax, bmax = pool_views(flat[:numel], M, N, d_in, d_out)
    keys = buffers.keys(first.A) if buffers is not None else None
    if keys is not None and keys.fits(units, weights, signs, generators) and keys.r.dtype == dt:
        # read_pools made the pass over the inputs while reading (on the read-ahead thread, if any)
        pa, pb, la, lb, sign = keys.pa, keys.pb, keys.la, keys.lb, keys.sign
        GB = keys.GB if keys.GB is not None and uses_blocks(threads, N, d_out, N, M, torch.device(device).type) else None
        if GB is not None:  # the modules the reader left: the same row blocks, modules side by side
            left = [m for m, done in enumerate(keys.has_gram) if not done]
            run_pool(lambda m: matmul_rows_into(B[m].T, B[m], GB[m]), [(m,) for m in left],
                     threads.gemm_workers_for(len(left) * 2.0 * N * N * d_out))
    else:
        pa, pb, la, lb, sign = _fill(units, weights, signs, generators, A, B, amax, bmax, dt, device, threads)
        GB = None
    return _pool_batch(units, features, A, B, pa, pb, la, lb, sign, device, threads, GB)


def _fill(units: list[list[RankUnits]], weights: list[list[float]], signs: str, generators: list[torch.Generator],
          A: torch.Tensor, B: torch.Tensor, amax: torch.Tensor, bmax: torch.Tensor, dt: torch.dtype,
          device: torch.device, threads: ThreadBudget) -> tuple[torch.Tensor, ...]:
    """build_pools' pass over the inputs: each copied (unless read in place) and weighted into its slots, with
    its sort-key projections, max-abs norms and signs taken while in cache.  Returns pa, pb, la, lb, sign."""
    M, N, d_in = A.shape
    d_out = B.shape[1]
    # sort keys: a seeded random r per module (float64 on the CPU, used in the work dtype)
    r = sort_vectors(generators, d_out + d_in, dt, device)
    pa, pb, la, lb = (torch.empty(M, N, dtype=dt, device=device) for _ in range(4))  # ⟨a, r⟩, ⟨b, r⟩, max-abs
    sign = torch.ones(M, N, dtype=dt, device=device)

    def fill(m: int) -> None:  # module m's inputs into the pool, each factor's keys and norms while in cache
        for at, u, w in zip(accumulate(u.rank for u in units[m]), units[m], relative_weights(weights[m])):
            sl = slice(at - u.rank, at)
            here = _in_slot(u.A, A[m, sl]) and _in_slot(u.B, B[m, :, sl])  # read in place (read_pools)
            # max |w·b| = max |b|·|w| exactly (rounding is monotone); of b before its slot is weighted
            lb[m, sl] = (bmax[m, sl] if here else max_abs_columns(u.B).to(dt)) * abs(w)
            if not here:
                A[m, sl].copy_(u.A)
            if w != 1.0:
                torch.mul(u.B.to(dt), w, out=B[m, :, sl])  # in the work dtype, not the input (in place: same bits)
            elif not here:
                B[m, :, sl].copy_(u.B)
            torch.mv(A[m, sl], r[m, d_out:], out=pa[m, sl])
            torch.mv(B[m, :, sl].T, r[m, :d_out], out=pb[m, sl])
            la[m, sl] = amax[m, sl] if here else A[m, sl].abs().amax(1)
            if signs == "rule":  # the largest-|entry| of a_i positive (first on ties), as RankUnits.canonical
                sign[m, sl] = sign_rule(A[m, sl])

    # one pass over the inputs, modules side by side on the budget's workers (each module single-threaded,
    # disjoint slices: the bits do not depend on the workers); ≈ 30 flop-equivalents per pooled entry
    on_cpu = torch.device(device).type == "cpu"
    run_pool(fill, [(m,) for m in range(M)], threads.workers_for(30.0 * M * N * (d_in + d_out)) if on_cpu else 1)
    return pa, pb, la, lb, sign


def _pool_batch(units: list[list[RankUnits]], features: str, A: torch.Tensor, B: torch.Tensor, pa: torch.Tensor,
                pb: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, sign: torch.Tensor, device: torch.device,
                threads: ThreadBudget, GB: torch.Tensor | None = None) -> PoolBatch:
    """The rest of build_pools: the N×N Grams (GB: already made by read_pools), the balance, the content
    order, the sorted Grams."""
    M, N, _ = A.shape
    # the two N×N Grams: the big products, on transposed views (BLAS reads them in place, same bits as on a
    # transposed copy: tests/test_lego.py; a copy is one more pass over the whole pool)
    GA = threads.matmul(A, A.transpose(1, 2))
    GB = threads.matmul(B.transpose(1, 2), B) if GB is None else GB
    na = torch.diagonal(GA, dim1=1, dim2=2).clamp_min(0).sqrt()
    nb = torch.diagonal(GB, dim1=1, dim2=2).clamp_min(0).sqrt()
    if features == "canonical":  # balanced as RankUnits.canonical: ‖a'‖ = ‖b'‖
        c, nonzero = balance_scale(na, nb)
        ca, cb = c * sign, sign * _inv(c, nonzero)
    else:  # paper / raw: the stored vectors (a unit with one zero half still has its other half)
        ca, cb = sign, sign.clone()
    # content order: ‖u‖² then |⟨u, r⟩| (sign-free), keys in float64 on the CPU
    proj = cb * pb + ca * pa
    norm2 = (ca**2 * na**2 + cb**2 * nb**2).double().cpu().numpy()
    absproj = proj.abs().double().cpu().numpy()
    order = torch.from_numpy(np.stack([np.lexsort((absproj[m], norm2[m])) for m in range(M)]).astype(np.int64))
    od = order.to(device)

    def sorted_gram(G: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.gather(1, od)
        G = G.gather(1, od[:, :, None].expand(M, N, N)).gather(2, od[:, None, :].expand(M, N, N))
        return G * s[:, :, None] * s[:, None, :]

    KA, KB = sorted_gram(GA, ca), sorted_gram(GB, cb)
    if features == "paper":
        FA, FB = sorted_gram(GA, sign * _inv(na, na > 0)), sorted_gram(GB, sign * _inv(nb, nb > 0))
    else:
        FA, FB = KA, KB
    linf = torch.maximum(ca.abs() * la, cb.abs() * lb).double().cpu()
    source = torch.stack([torch.cat([u.source.cpu() for u in us]) for us in units]).gather(1, order)
    n_in = [max(len(us), 1) for us in units]
    target_scale = [1.0 / n for n in n_in]
    target_norm2 = (GA.double() * GB.double()).sum((1, 2)).clamp_min(0).cpu() / torch.tensor(n_in).double() ** 2
    mean_rank = [float(sum(u.rank for u in us)) / max(len(us), 1) for us in units]
    return PoolBatch(A, B, ca, cb, order, KA, KB, FA, FB, linf.gather(1, order), source, target_norm2,
                     target_scale, mean_rank, [us[0] for us in units])
