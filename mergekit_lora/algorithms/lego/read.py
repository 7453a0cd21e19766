"""LoRA-LEGO's inputs read straight into a batch pool (:func:`read_pools`), the buffers batches are read into
(:class:`PoolBuffers`, shared with the read-ahead thread) and what the read computes on the way
(:class:`PoolKeys`: weighting, sort-key projections, max-abs norms, signs, B-Grams), which
:func:`pool.build_pools` then uses instead of its own pass over the inputs (the same operations on the same
values: the same bits)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from mergekit_lora.adapter import Adapter, within_bounds
from mergekit_lora.threads import (
    NO_BUDGET,
    Busy,
    ThreadBudget,
    Workspace,
    matmul_rows_into,
    run_pool,
    uses_blocks,
)
from mergekit_lora.units import RankUnits, sign_rule

from .pool import max_abs_columns, pool_numel, pool_views, relative_weights, sort_vectors


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
        self.merges = Busy()  # batches being merged now (Lego.merge_batch), on any thread

    @property
    def merging(self) -> bool:
        """Whether a batch is being merged now (a read may then take work off the merging thread)."""
        return self.merges.count > 0

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
