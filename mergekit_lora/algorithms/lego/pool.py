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
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from mergekit_lora.adapter import Adapter, within_bounds
from mergekit_lora.threads import NO_BUDGET, ThreadBudget, Workspace, matmul_rows_into, run_pool, uses_blocks
from mergekit_lora.units import RankUnits, balance_scale, sign_rule


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


class PoolBuffers:
    """The flat buffers :func:`read_pools` reads batches into, shared by threads: a batch takes a free one
    (or a new one) and :meth:`give` returns it once merged, so a batch read ahead on another thread never
    writes into the pool being merged (two buffers then; one when batches come in turn; free ones that do
    not fit a batch are dropped).  :func:`build_pools` finds a batch's buffer from its units (:meth:`holder`).  Not pickled."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._taken: dict[int, torch.Tensor] = {}  # storage address -> the whole buffer
        self._keys: dict[int, PoolKeys] = {}  # storage address -> what read_pools computed while reading
        self._merging = 0  # batches being merged now (Lego.merge_batch), on any thread

    @property
    def merging(self) -> bool:
        """Whether a batch is being merged now (a read may then take work off the merging thread)."""
        return self._merging > 0

    @contextmanager
    def merge(self) -> Iterator[None]:
        """Count the enclosed work as a merge in progress (:attr:`merging`)."""
        with self._lock:
            self._merging += 1
        try:
            yield
        finally:
            with self._lock:
                self._merging -= 1

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat uninitialised CPU tensor of ``numel`` entries, the start of a buffer now taken."""
        with self._lock:
            at = next((i for i, b in enumerate(self._free) if b.dtype == dtype and b.numel() >= numel), None)
            fit = self._free.pop(at) if at is not None else None  # (list.remove would compare tensors)
            if fit is None:
                self._free.clear()  # none fits: drop them before allocating (memory: the largest pools only)
        if fit is None:
            fit = torch.empty(numel, dtype=dtype)
        with self._lock:
            self._taken[fit.untyped_storage().data_ptr()] = fit
        return fit[:numel]

    def holder(self, t: torch.Tensor) -> torch.Tensor | None:
        """The taken buffer ``t`` is a view of (None: not one :func:`read_pools` filled)."""
        with self._lock:
            return self._taken.get(t.untyped_storage().data_ptr())

    def note(self, t: torch.Tensor, keys: PoolKeys) -> None:
        """Attach ``keys`` to the taken buffer ``t`` is a view of (until it is given back)."""
        with self._lock:
            self._keys[t.untyped_storage().data_ptr()] = keys

    def keys(self, t: torch.Tensor) -> PoolKeys | None:
        """The :class:`PoolKeys` noted for the buffer ``t`` is a view of, if any."""
        with self._lock:
            return self._keys.get(t.untyped_storage().data_ptr())

    def give(self, t: torch.Tensor) -> None:
        """Return the buffer ``t`` is a view of (nothing when it is none of the taken ones)."""
        with self._lock:
            self._keys.pop(t.untyped_storage().data_ptr(), None)
            buf = self._taken.pop(t.untyped_storage().data_ptr(), None)
            if buf is not None and len(self._free) < 2:
                self._free.append(buf)

    def __reduce__(self) -> tuple:
        return (PoolBuffers, ())


_STAGE = Workspace()  # read_pools' contiguous B factors of one module (per thread), concatenated into the pool


@dataclass(frozen=True)
class PoolKeys:
    """The per-unit values of :func:`build_pools`' pass over the inputs, taken by :func:`read_pools` while it
    read them (on the read-ahead thread when there is one) for given weights, signs and sort-key generators:
    ⟨a, r⟩, ⟨b, r⟩ (b weighted), the max-abs norms ‖a‖_∞, ‖ω b‖_∞ and the sign-rule signs, [M, N] each
    (input order, the work dtype), and the random sort-key vectors r [M, d_out + d_in].  ``build_pools`` uses
    them when its own weights, signs and generators are these (same ops on the same operands: the same bits)."""

    units: list[list[RankUnits]]  # the units read_pools returned (build_pools checks it gets these very ones)
    weights: list[list[float]]
    signs: str
    states: list[torch.Tensor]  # the sort-key generators' states before r was drawn
    r: torch.Tensor
    pa: torch.Tensor
    pb: torch.Tensor
    la: torch.Tensor
    lb: torch.Tensor
    sign: torch.Tensor
    GB: torch.Tensor | None = None  # [M, N, N] B-Grams BᵀB (weighted B) as blocked_matmul's row blocks, or None
    has_gram: list[bool] | None = None  # which modules' GB[m] are computed (the others: build_pools computes them)

    def fits(self, units: list[list[RankUnits]], weights: list[list[float]], signs: str,
             generators: list[torch.Generator]) -> bool:
        return (len(units) == len(self.units) and signs == self.signs and weights == self.weights
                and all(len(us) == len(vs) and all(u is v for u, v in zip(us, vs)) for us, vs in zip(units, self.units))
                and len(generators) == len(self.states)
                and all(torch.equal(g.get_state(), s) for g, s in zip(generators, self.states)))


def sort_vectors(generators: list[torch.Generator], n: int, dt: torch.dtype, device: torch.device | str = "cpu"
                 ) -> torch.Tensor:
    """The pool order's random vectors r [M, n]: float64 from each module's seeded generator, in ``dt``."""
    return torch.stack([torch.randn(n, generator=g, dtype=torch.float64) for g in generators]).to(device=device, dtype=dt)


def _max_abs_rows(X: torch.Tensor) -> torch.Tensor:
    """max_j |X_ij| per row of X [n, d] (exact; NaN stays NaN): a min and a max pass, no |X| temporary
    (2× faster than ``abs().amax``; ``aminmax(dim=1)`` is 4× slower than that)."""
    return torch.maximum(X.amin(1).neg_(), X.amax(1)).abs_()  # abs: ±0 gives +0


def _max_abs_column_blocks(X: torch.Tensor) -> torch.Tensor:
    """:func:`max_abs_columns` of each X[t] [d, r] of X [n, d, r], as [n·r] (one pass for all n)."""
    n, d, r = X.shape
    g = math.gcd(d, 8)
    X2 = X.reshape(n, d // g, g * r)
    return torch.maximum(X2.amin(1).neg_(), X2.amax(1)).reshape(n, g, r).amax(1).abs_().reshape(-1)


def read_pools(inputs: list[list[tuple[Adapter, int]]], names: list[str], buffers: PoolBuffers,
               threads: ThreadBudget = NO_BUDGET, *, weights: list[list[float]] | None = None,
               generators: list[torch.Generator] | None = None, signs: str = "none"
               ) -> list[list[RankUnits]] | None:
    """Each module's inputs (``inputs[m]``: (adapter, input index) of module ``names[m]``) read straight into
    their slots of the batch pool, where :func:`build_pools` then finds them (no copy of A; B through a
    reused contiguous buffer, then one ``cat``); modules side by side on the budget's workers (disjoint slots:
    the bits do not depend on the workers).  An input whose reader cannot read in place is loaded as usual
    and copied into its slots.  The checks of :meth:`Adapter.units` (NaN/Inf, magnitude) are made once per
    module from the row max-abs of A and column max-abs of B of all its inputs (max is exact: the same
    values as per input; an input that fails is read again as usual, for the same message).

    With ``weights`` and ``generators`` (the sort keys'), the rest of ``build_pools``' pass over the inputs
    is done here too, while each module is in cache (:class:`PoolKeys`: B weighted in its slots, sort-key
    projections, max-abs norms, ``signs == "rule"`` signs), so with read-ahead it runs on the reading thread.

    The units read are views of a buffer taken from ``buffers``, valid until the buffer is given back (after
    the merge); their B is weighted when ``weights`` are given.  None (nothing read) unless every input stores
    float32 (or every one float64) and the modules pool one shape."""
    infos = [[a.modules[n] for a, _ in ins] for ins, n in zip(inputs, names)]
    dtypes = {i.dtype for inf in infos for i in inf}
    shapes = {(sum(i.rank for i in inf), i.d_in, i.d_out) for inf in infos for i in inf}
    if len(dtypes) != 1 or not dtypes <= {"float32", "float64"} or len(shapes) != 1 or not all(infos):
        return None
    (N, d_in, d_out), = shapes
    dt = getattr(torch, dtypes.pop())
    M = len(names)
    flat = buffers.take(pool_numel(M, N, d_in, d_out), dt)
    A, B, amax, bmax = pool_views(flat, M, N, d_in, d_out)
    out: list[list[RankUnits]] = [[] for _ in names]
    keys = weights is not None and generators is not None
    # B's Gram too, module by module while its B is in cache, when the batch's product is made of row blocks
    # (then per module it is the same products: the same bits) and only while another thread is merging
    # (PoolBuffers.merging): the read-ahead thread takes the B-Grams (≈ 0.35 s of the 7B layout's 0.65 s of
    # Grams) when the merging thread is the busier one, and leaves them to build_pools when the merging
    # thread waits for the read; which thread computes a module's B-Gram never changes its bits
    GB = torch.empty(M, N, N, dtype=dt) if keys and uses_blocks(threads, N, d_out, N, M) else None
    has_gram = [False] * M
    if keys:
        states = [g.get_state() for g in generators]
        r = sort_vectors(generators, d_out + d_in, dt)
        pa, pb = torch.empty(M, N, dtype=dt), torch.empty(M, N, dtype=dt)  # as build_pools allocates them
        sign = torch.ones(M, N, dtype=dt)
        absw = torch.empty(M, N, dtype=dt)

    # the units' sources (input index per unit), views of one tensor
    source = torch.tensor([[i for (_, i), info in zip(ins, inf) for _ in range(info.rank)]
                           for ins, inf in zip(inputs, infos)], dtype=torch.long)

    def read(m: int) -> None:  # module m's inputs: A into its slots, B into a staging buffer, then one cat
        stage = _STAGE.buffer(d_out * N, dt, "cpu")
        slots, at = [], 0
        for (a, i), info in zip(inputs[m], infos[m]):
            sl = slice(at, at + info.rank)
            piece = stage[d_out * at:d_out * sl.stop].view(d_out, info.rank)
            if a.factors_into(names[m], A[m, sl], piece):  # checked below, per module
                out[m].append(None)
            else:  # loaded as usual (checked), copied into the slots
                u = a.units(names[m], source=i)
                A[m, sl].copy_(u.A)
                piece.copy_(u.B)
                out[m].append(u)
            slots.append(sl)
            at = sl.stop
        # the checks and max-abs norms of the whole module at once (two passes, in cache)
        amax[m] = _max_abs_rows(A[m])
        ranks = {sl.stop - sl.start for sl in slots}
        if len(ranks) == 1:
            bmax[m] = _max_abs_column_blocks(stage[:d_out * N].view(len(slots), d_out, ranks.pop()))
        else:
            for sl in slots:
                bmax[m, sl] = max_abs_columns(stage[d_out * sl.start:d_out * sl.stop].view(d_out, -1))
        am, bm = amax[m].numpy(), bmax[m].numpy()  # numpy max: NaN stays NaN
        if not within_bounds(float(am.max()), float(bm.max()), max(info.rank for info in infos[m])):
            for (a, _), sl in zip(inputs[m], slots):  # one fails: the first, with its own message
                a.check_read(names[m], float(am[sl].max()), float(bm[sl].max()))
        if keys:
            omega = relative_weights(weights[m])
            absw[m] = torch.tensor([abs(w) for w, sl in zip(omega, slots) for _ in range(sl.stop - sl.start)], dtype=dt)
            for w, sl in zip(omega, slots):
                if w != 1.0:  # B × ω in the work dtype, as build_pools does (the same bits)
                    stage[d_out * sl.start:d_out * sl.stop].mul_(w)
        pieces = [stage[d_out * sl.start:d_out * sl.stop].view(d_out, -1) for sl in slots]
        if keys:  # build_pools' sort-key projections: the same products on the same values (b weighted)
            for sl, piece in zip(slots, pieces):
                torch.mv(A[m, sl], r[m, d_out:], out=pa[m, sl])
                # from the contiguous staged b (in cache; 2× faster than from its strided slot): the same
                # gemv on another leading dimension, the same bits (tests/test_lego_read.py checks the pool
                # against build_pools' own pass, which projects the slot)
                torch.mv(piece.T, r[m, :d_out], out=pb[m, sl])
            if signs == "rule":  # per row: the whole module at once is the same as per input
                sign[m] = sign_rule(A[m])
        torch.cat(pieces, dim=1, out=B[m])  # row by row: faster than a strided copy per input
        if GB is not None and buffers.merging:
            matmul_rows_into(B[m].T, B[m], GB[m])
            has_gram[m] = True
        out[m] = [RankUnits(A[m, sl], B[m, :, sl], source[m, sl], tuple(info.weight_shape), info.kind, info.fan_in_fan_out)
                  if u is None else u.with_factors(A[m, sl], B[m, :, sl], u.source)
                  for u, sl, info in zip(out[m], slots, infos[m])]

    run_pool(read, [(m,) for m in range(M)], threads.workers_for(30.0 * (A.numel() + B.numel())))
    if keys:
        buffers.note(flat, PoolKeys(out, [list(w) for w in weights], signs, states, r, pa, pb, amax, bmax * absw, sign,
                                    GB if any(has_gram) else None, has_gram))
    return out


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
