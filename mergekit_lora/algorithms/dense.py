"""Shared machinery of the elementwise methods (TIES, DARE, magnitude pruning): dense, then refactor.

Elementwise operations (trim by magnitude, random drop, sign election) do not commute with the
factorisation, so these methods form each input's dense ΔW_i = B_i A_i, combine them, and refactor
the dense result D into k rank units by a truncated SVD.  Everything is written as pure functions on
a *batch* of M same-shape modules (tensors [M, d_out, d_in]); the class plumbing at the bottom only
routes the driver's calls to them.

Work per batch of M modules (:func:`dense_combine`, implemented in :mod:`algorithms.elementwise`),
chunk by chunk (one module's rows, CHUNK_ELEMENTS per chunk, so every temporary stays in cache;
chunks may run on a small thread pool):

1. trim thresholds first (:func:`trim_thresholds`): the exact k-th largest |ΔW_i| per module from a
   sampled bracket and one counting pass — no full sort or ``kthvalue`` of ΔW;
2. per chunk and input: ΔW_i rows = B_i[j, rows] @ A_i[j] (float32; float64 when an input is float64),
   the trim (``hardshrink`` at the module's threshold) or DARE mask, the weight; then the weighted sum
   or TIES sign election and disjoint mean (:func:`disjoint_mean`) — float ops only, never a stack of
   all inputs' full dense tensors;
3. refactorisation (:func:`refactor_batch`): the exact SVD for small matrices, else a range finder
   seeded with the inputs' own column spaces [B_1 … B_n] plus ``oversample`` Gaussian columns, power
   iterations until the module's own spectrum bounds the error (:func:`_power_iterations`; ``niter`` fixes
   the count), then Rayleigh–Ritz.  D's dominant part lies in span(B_1 … B_n) (trimming adds a flat noise
   floor below it), so this converges in a few iterations where a Gaussian start with k + 8 columns does
   not: ≤ 3e-4 relative to the exact rank-k SVD on random adapters (the hard, flat case; RESULTS-refactor.md).
   Each module's error ‖D − D_k‖² = ‖D‖² − Σ_{j≤k} σ_j² (exact for the Ritz projection) is returned for the
   report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch

from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext, Notes
from mergekit_lora.threads import NO_BUDGET, ThreadBudget, single_thread
from mergekit_lora.units import RankUnits

from .elementwise import Combine, chunk_sq_norm, dense_combine_factors, row_chunks
from .elementwise import disjoint_mean as disjoint_mean  # re-exported
from .elementwise import trim_thresholds as trim_thresholds  # re-exported
from .params import DenseParams, SignFrom

# Elements of one [M, d_out, d_in] work tensor per sub-batch (~8 such tensors live at once: 32 MiB
# each in float32), so a batch's memory is bounded whatever the driver hands over.
BATCH_ELEMENTS = 1 << 23
# The exact SVD is used when min(d_out, d_in) ≤ EXACT_MIN_DIM (measured crossover: RESULTS-dense.md).
EXACT_MIN_DIM = 160
# Adaptive subspace iteration (``niter`` unset): stop when (σ̂_q/σ̂_k)^(2t) ≤ this bound, after NITER_MAX at
# most.  The measured error against the exact rank-k SVD stayed ≤ 0.27× the bound (RESULTS-refactor.md).
CONVERGENCE_BOUND = 2e-3
NITER_MAX = 6


P = TypeVar("P", bound=DenseParams)


# ---------------------------------------------------------------------------------------- products
def work_dtype(units: Sequence[RankUnits]) -> torch.dtype:
    """float32, or float64 when any input factor is float64."""
    dt = torch.float32
    for u in units:
        dt = torch.promote_types(dt, torch.promote_types(u.A.dtype, u.B.dtype))
    return dt


def stacked(modules: Sequence[Sequence[RankUnits]], i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Input i's factors over the batch: (B [M, d_out, r], A [M, r, d_in]) in ``dtype``."""
    B = torch.stack([m[i].B for m in modules]).to(dtype)
    A = torch.stack([m[i].A for m in modules]).to(dtype)
    return B, A


# ---------------------------------------------------------------------------------------- elementwise combine
def chunk_workers(modules: Sequence[Sequence[RankUnits]], ctxs: Sequence[ModuleContext]) -> int:
    """Chunk workers for a batch from the context's thread budget (by the work: ~2r + 20 flops per element
    and input)."""
    u = modules[0][0]
    return ctxs[0].threads.workers_for(len(modules) * len(modules[0]) * u.d_out * u.d_in * (2.0 * u.rank + 20))


def dense_combine(modules: Sequence[Sequence[RankUnits]], weights: Sequence[float], dtype: torch.dtype, *,
                  combine: Combine, density: float = 1.0, drop: Sequence[torch.Generator] | None = None,
                  scale: float = 1.0, workers: int = 1, sign_from: SignFrom = "weighted",
                  norms: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """D [M, d_out, d_in] = scale · combine_i(w_i · step_ρ(ΔW_i)) for M same-shape modules, chunk-fused
    (:func:`algorithms.elementwise.dense_combine_factors` on the inputs' factors stacked in ``dtype``; ``norms``,
    ``out``: see there)."""
    factors = [stacked(modules, i, dtype) for i in range(len(weights))]
    return dense_combine_factors(factors, weights, combine=combine, density=density, drop=drop, scale=scale,
                                 workers=workers, sign_from=sign_from, norms=norms, out=out)


# ---------------------------------------------------------------------------------------- refactorisation
def use_exact(m: int, n: int, params: DenseParams) -> bool:
    """Exact dense SVD when asked, or when the matrix is small enough that it is the faster choice."""
    return params.exact_svd or min(m, n) <= EXACT_MIN_DIM


def _orth(Y: torch.Tensor) -> torch.Tensor:
    with single_thread():  # LAPACK: same bits whatever the thread budget
        return torch.linalg.qr(Y).Q


def blas_view(X: torch.Tensor) -> torch.Tensor:
    """X itself when BLAS can read it in place (row- or column-major matrices, e.g. a transposed view), else a
    contiguous copy.  A transposed [M, n, m] copy of a big D costs ~10× the product it feeds (measured: 0.26 s
    vs 0.025 s for 5632×2048 @ 2048×72), and MKL's GEMM gives the same bits on the view (its packing
    reads either layout; tested in tests/test_dense_perf.py)."""
    return X if X.stride(-1) == 1 or X.stride(-2) == 1 else X.contiguous()


def _mm(X: torch.Tensor, Y: torch.Tensor, threads: ThreadBudget) -> torch.Tensor:
    return threads.matmul(blas_view(X), blas_view(Y))


def _mm_tn(Q: torch.Tensor, D: torch.Tensor, threads: ThreadBudget) -> torch.Tensor:
    """Qᵀ D ([M, m, q], [M, m, n] -> [M, q, n]) in column blocks of D: MKL's kernel for Qᵀ D runs at 1.0–1.4 ns
    per element of D where the same product as Dᵀ Q (a transposed D) takes 2.3–2.5 (q = 72, 1 thread;
    RESULTS-dense.md), so the power iteration forms (Qᵀ D)ᵀ instead of Dᵀ Q."""
    return threads.matmul(Q.transpose(1, 2), blas_view(D), by="cols")


def sq_norms(D: torch.Tensor) -> torch.Tensor:
    """‖D[j]‖² per module ([M, m, n] -> [M] float64), summed chunk by chunk in a fixed order."""
    M, m, n = D.shape
    out = torch.zeros(M, dtype=torch.float64, device=D.device)
    for j, a, b in row_chunks(M, m, n, D.device):
        out[j] += chunk_sq_norm(D[j, a:b])
    return out


def refactor_batch(D: torch.Tensor, k: int, params: DenseParams, start: torch.Tensor | None,
                   gens: Sequence[torch.Generator], threads: ThreadBudget = NO_BUDGET,
                   norm2: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Truncated SVD of each D[j] ([M, m, n]) as balanced factors.

    Returns (B [M, m, k'], A [M, k', n], err² [M], ‖D‖² [M], power iterations per module) with
    k' = min(k, m, n), b_j = u_j √σ_j, a_j = √σ_j v_jᵀ, err² = ‖D − B A‖² (float64; iterations 0 where the
    exact SVD ran).  ``start`` [M, m, R]: columns whose span is expected to hold D's dominant part (the
    inputs' B); ``gens``: one seeded CPU generator per module for the Gaussian oversampling columns;
    ``threads``: the budget of the big products; ``norm2``: ‖D[j]‖² when already known (:func:`sq_norms`'
    values, e.g. summed while D was formed).  Each module is iterated on its own (its bits do not depend on
    its batch).
    """
    M, m, n = D.shape
    k = min(k, m, n)
    norm2 = sq_norms(D) if norm2 is None else norm2
    if use_exact(m, n, params):
        with single_thread():
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        U, S, Vh = U[:, :, :k], S[:, :k], Vh[:, :k]
        iters = [0] * M
    else:
        p = params.oversample if start is not None else max(params.oversample, k)
        omega = torch.stack([torch.randn(n, p, generator=g, dtype=torch.float32) for g in gens]).to(D)
        cols = [start.to(D)] if start is not None else []
        Q0 = _orth(torch.cat(cols + [_mm(D, omega, threads)], 2)[:, :, :min(m, n)])
        done = [_power_iterations(D[j:j + 1], Q0[j:j + 1], k, params.niter, threads) for j in range(M)]
        Q = torch.cat([q for q, _ in done])
        iters = [t for _, t in done]
        small = _mm_tn(Q, D, threads)  # [M, q, n]
        with single_thread():
            Us, S, Vh = torch.linalg.svd(small, full_matrices=False)
        U = _mm(Q, Us[:, :, :k], threads)
        S, Vh = S[:, :k], Vh[:, :k]
    err2 = (norm2 - S.double().square().sum(1)).clamp(min=0)
    root = S.clamp(min=0).sqrt()
    return (U * root[:, None, :]).contiguous(), (root[:, :, None] * Vh).contiguous(), err2, norm2, iters


def _power_iterations(D: torch.Tensor, Q: torch.Tensor, k: int, niter: int | None,
                      threads: ThreadBudget) -> tuple[torch.Tensor, int]:
    """Subspace iteration Q ← orth(D · orth(Dᵀ Q)) on one module (D [1, m, n], Q [1, m, q] orthonormal).

    ``niter`` given: exactly that many iterations.  None: adaptive — after iteration t, with σ̂ the singular
    values of R in D·P = Q R (lower estimates of D's top q), stop once the convergence bound
    (σ̂_q / σ̂_k)^(2t) ≤ CONVERGENCE_BOUND, and after NITER_MAX at most.  The error against the exact rank-k
    SVD was 0.05–0.27× that bound in every case measured (RESULTS-refactor.md), so a module stops as soon
    as its own spectrum says it is within ~5e-4, where a fixed count either wastes passes over D (a clear
    gap: 2 suffice) or stops short (a flat spectrum at low density: 4 needed).  Returns (Q, iterations).
    """
    if niter is not None:
        for _ in range(niter):
            Q = _orth(_mm(D, _orth(_mm_tn(Q, D, threads).transpose(1, 2)), threads))
        return Q, niter
    for t in range(1, NITER_MAX + 1):
        Y = _mm(D, _orth(_mm_tn(Q, D, threads).transpose(1, 2)), threads)
        with single_thread():  # LAPACK: same bits whatever the thread budget
            Q, R = torch.linalg.qr(Y)
            s = torch.linalg.svdvals(R[0])
        if s[k - 1] <= 0 or float(s[-1] / s[k - 1]) ** (2 * t) <= CONVERGENCE_BOUND:  # s[k-1] = 0: rank < k
            return Q, t
    return Q, NITER_MAX


# ---------------------------------------------------------------------------------------- the batch driver
# step(params, ctxs) -> the keyword arguments of dense_combine (combine, density, drop, scale, sign_from)
StepFn = Callable[[Any, Sequence[ModuleContext]], dict[str, Any]]


def merge_dense_batch(step: StepFn, modules: Sequence[Sequence[RankUnits]], weights: Sequence[float],
                      params: DenseParams, ctxs: Sequence[ModuleContext]) -> list[tuple[RankUnits, dict[str, float]]]:
    """Merge M same-shape modules (same weights): D = :func:`dense_combine` with ``step``'s arguments (its
    ‖D‖² summed while it is formed), refactored to rank k.

    Returns per module (units, notes) with notes ``refactor_err2`` and ``norm2`` (float64 sums for the
    report).  Sub-batches keep each [M, d_out, d_in] work tensor ≤ BATCH_ELEMENTS.
    """
    first = modules[0]
    per = max(1, BATCH_ELEMENTS // max(first[0].d_out * first[0].d_in, 1))
    out: list[tuple[RankUnits, dict[str, float]]] = []
    buf: torch.Tensor | None = None  # D's memory, reused by the sub-batches (same shape)
    for s in range(0, len(modules), per):
        mods, cx = modules[s:s + per], ctxs[s:s + per]
        dtype = work_dtype([u for m in mods for u in m])
        if buf is None or buf.dtype != dtype:
            buf = torch.empty(min(per, len(modules)), first[0].d_out, first[0].d_in, dtype=dtype,
                              device=cx[0].device)
        norms = torch.zeros(len(mods), dtype=torch.float64)
        D = dense_combine(mods, weights, dtype, workers=chunk_workers(mods, cx), norms=norms, out=buf[:len(mods)],
                          **step(params, cx))
        k = params.rank or max(u.rank for u in mods[0])
        start = torch.stack([torch.cat([u.B for u in m], 1) for m in mods]).to(D)
        B, A, err2, norm2, iters = refactor_batch(D, k, params, start, [c.generator("svd_lowrank") for c in cx],
                                                  cx[0].threads, norm2=norms.to(D.device))
        del D
        for j, m in enumerate(mods):
            units = replace(m[0], A=A[j], B=B[j], source=torch.full((A.shape[1],), -1, dtype=torch.long), extra={})
            out.append((units, {"refactor_err2": float(err2[j]), "norm2": float(norm2[j]), "refactor_iters": iters[j]}))
    return out


def report_notes(notes: Sequence[Notes], params: DenseParams | None) -> dict[str, Any]:
    """The refactorisation error ‖D − D_k‖/‖D‖ over all modules (root of summed squares) and the worst."""
    if not notes:
        return {}
    e2 = sum(n["refactor_err2"] for n in notes)
    t2 = sum(n["norm2"] for n in notes)
    worst = max((math.sqrt(n["refactor_err2"] / n["norm2"]) if n["norm2"] > 0 else 0.0) for n in notes)
    if params is None or params.exact_svd:
        how = "exact dense SVD"
    else:
        iters = sorted({n["refactor_iters"] for n in notes if n.get("refactor_iters")})
        used = f"{iters[0]}–{iters[-1]}" if len(iters) > 1 else (f"{iters[0]}" if iters else "no")
        rule = (f"{params.niter} power iterations" if params.niter is not None else
                f"power iterations until (σ̂_q/σ̂_k)^(2t) ≤ {CONVERGENCE_BOUND:g} (at most {NITER_MAX}): {used} per module")
        how = (f"exact dense SVD when min(d_out, d_in) ≤ {EXACT_MIN_DIM}, else subspace iteration from the "
               f"inputs' B columns + {params.oversample} Gaussian columns, {rule}")
    return {"refactorisation": how,
            "refactor rel. error ‖D−D_k‖/‖D‖ (overall, incl. rank-k truncation)": math.sqrt(e2 / t2) if t2 else 0.0,
            "refactor rel. error (worst module)": worst}


class DenseAlgorithm(Algorithm[P]):
    """Base of the dense-then-refactor methods: subclasses implement :meth:`dense_batch` (pure).

    Each module's notes carry its refactorisation error² and ‖D‖²; :meth:`report` sums them.
    """

    Params = DenseParams

    @staticmethod
    def dense_batch(modules: Sequence[Sequence[RankUnits]], weights: Sequence[float], params: Any,
                    ctxs: Sequence[ModuleContext], dtype: torch.dtype) -> torch.Tensor:
        """The combined dense updates D [M, d_out, d_in] before refactorisation."""
        raise NotImplementedError

    @staticmethod
    def elementwise(params: Any, ctxs: Sequence[ModuleContext]) -> dict[str, Any]:
        """The keyword arguments of :func:`dense_combine_factors` (combine, density, drop, scale) for
        ``params``; ``space=core`` runs the same step on the core matrices (:mod:`algorithms.core_space`)."""
        raise NotImplementedError

    def dense(self, units: list[RankUnits], weights: list[float], params: P, ctx: ModuleContext) -> torch.Tensor:
        """One module's D ([d_out, d_in])."""
        return self.dense_batch([units], weights, params, [ctx], work_dtype(units))[0]

    def batch_limit(self, params: P) -> int:
        return 1 if params.space == "core" else 32  # core: per-module R×R work, nothing to batch

    def merge_batch(self, units: list[list[RankUnits]], weights: list[list[float]], params: P,
                    ctxs: list[ModuleContext]) -> list[MergedModule]:
        if params.space == "core":
            from .core_space import elementwise_merge

            return [elementwise_merge(u, w, self.elementwise(params, [c]), params.rank)
                    for u, w, c in zip(units, weights, ctxs)]
        if any(list(w) != list(weights[0]) for w in weights):  # the driver groups equal weights; be safe
            return [self.merge_batch([u], [w], params, [c])[0] for u, w, c in zip(units, weights, ctxs)]
        res = merge_dense_batch(self.elementwise, units, weights[0], params, ctxs)
        return [MergedModule(u, notes=n) for u, n in res]

    def merge_module(self, units: list[RankUnits], weights: list[float], params: P,
                     ctx: ModuleContext) -> MergedModule:
        return self.merge_batch([units], [weights], params, [ctx])[0]

    def report(self, notes: Sequence[tuple[str, Notes]], params: P) -> dict[str, Any]:
        if params.space == "core":
            from .core_space import report

            return report(notes, "core (singular-vector bases of the stacked B's and A's; exact)")
        return report_notes([n for _, n in notes], params)  # type: ignore[arg-type]
