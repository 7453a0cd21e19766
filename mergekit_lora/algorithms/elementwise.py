"""The elementwise half of the dense methods: trim thresholds, DARE masks, sign election, chunk-fused.

Everything here works on a batch of M same-shape modules whose inputs are given as factors
(B_i [M, d_out, r], A_i [M, r, d_in]); no input's dense ΔW_i is ever held whole.  Work is split into
*chunks* (module j, rows a:b) of ~CHUNK_ELEMENTS elements: each chunk's products ΔW_i[j, a:b] =
B_i[j, a:b] @ A_i[j] are formed, masked, weighted and combined while they sit in cache.

Cost model (measured per element on the benchmark machine, 1 thread, 128k-element fp32 chunks,
RESULTS-dense.md): a float op with a scalar (mul, add, abs, sign, hardshrink) ≈ 0.1–0.15 ns; a
comparison into a *bool* tensor ≈ 0.46 ns, a multiply by a bool tensor ≈ 0.7 ns, ``torch.where``
with a scalar ≈ 3 ns; ``torch.bernoulli`` of a probability tensor 12.8 ns, ``torch.rand`` 2.9 ns.  So
the passes below use float ops with per-module *scalar* thresholds (``hardshrink``), compare into
float outputs, and draw DARE masks with ``rand`` (the same stream as ``bernoulli``, tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mergekit_lora.threads import run_pool

from .params import SignFrom, SignMethod

Combine = Literal["sum", "total", "frequency"]
Chunk = tuple[int, int, int]  # (module j, first row a, end row b)

# Elements of one [rows, d_in] chunk (256 KiB in float32): the fused per-chunk work (n products plus ~3 running
# tensors, ~1.75 MiB for 4 inputs) stays in a 2 MiB L2 instead of streaming [M, d_out, d_in] tensors through
# memory.  Measured on the whole `ties` merge at the 22-layer TinyLlama layout, 1 thread, same run: 2^16 took
# 28.9 CPU s, 2^18 31.5 (same bytes; RESULTS-dense.md); the earlier 2^17–2^18 optimum predates the numpy scan.
CHUNK_ELEMENTS = 1 << 16


def row_chunks(M: int, m: int, n: int, device: torch.device | None = None) -> list[Chunk]:
    """(module, first row, end row) chunks of ~CHUNK_ELEMENTS elements; on CUDA one chunk per module."""
    if device is not None and device.type == "cuda":
        return [(j, 0, m) for j in range(M)]
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    return [(j, r, min(r + rows, m)) for j in range(M) for r in range(0, m, rows)]


def run_chunks(fn: Callable[[int, int, int], Any], chunks: Sequence[Chunk], workers: int) -> list[Any]:
    """fn over the chunks, in order; with ``workers`` > 1 on a thread pool (:func:`mergekit_lora.threads.run_pool`:
    chunks are independent, so the result does not depend on the worker count)."""
    return run_pool(fn, chunks, workers)


def chunk_product(B: torch.Tensor, A: torch.Tensor, j: int, a: int, b: int) -> torch.Tensor:
    """ΔW[j, a:b] = B[j, a:b] @ A[j] ([b − a, d_in]): the one product every pass uses (same bits)."""
    return torch.mm(B[j, a:b], A[j])


def chunk_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖² of one chunk [rows, n] (0-d float64): each row's squares summed in x's dtype, the rows in float64
    — 0.2 ns per element where a float64 sum of every square took 1.0 (1 thread), ~1e-7 relative."""
    return x.mul(x).sum(dim=-1).sum(dtype=torch.float64)


def lambdas(t: torch.Tensor) -> list[float]:
    """For thresholds t ([M], any float dtype): the largest value of t's dtype below each, as Python
    floats (exact in that dtype), so that ``hardshrink(x, λ)`` keeps exactly the entries with |x| ≥ t."""
    return t.nextafter(torch.full_like(t, -math.inf)).tolist()


def keep_at_least(x: torch.Tensor, lam: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x where |x| > lam, else 0 (one float pass; with lam from :func:`lambdas`: where |x| ≥ t); into ``out``
    when given (``x`` itself: in place)."""
    return F.hardshrink(x, lam) if out is None else torch.hardshrink(x, lam, out=out)


# ---------------------------------------------------------------------------------------- trim thresholds
def trim_thresholds(B: torch.Tensor, A: torch.Tensor, density: float, chunks: Sequence[Chunk],
                    workers: int = 1, sample: int = 1 << 14) -> torch.Tensor:
    """Exact per-module magnitude thresholds of ΔW = B @ A ([M, d_out, r] @ [M, r, d_in]) without forming it.

    The k-th largest |ΔW| (k = int(density · numel)) per module: a bracket [lo, hi] from a sample of
    entries (dot products at fixed-seed positions), then one chunked pass that counts the entries
    above hi and collects those inside the bracket, and an exact selection among them.  If the
    bracket misses (rounding at its edge, or bad luck: ~1e-4), the module's |ΔW| is formed chunk by
    chunk and ``kthvalue`` decides.  The products are :func:`chunk_product`'s, as in the combine pass,
    so the threshold is exactly one of the values that pass compares against.  Returns [M] (B's dtype).
    """
    M, m, _ = B.shape
    n = A.shape[2]
    N = m * n
    k = int(density * N)
    g = torch.Generator().manual_seed(0x5EED)
    q = 1.0 - k / N
    centre, margin = q * sample, 4.0 * math.sqrt(sample * q * (1 - q)) + 2
    lo_i, hi_i = math.floor(centre - margin), math.ceil(centre + margin)
    if not (N > 4 * sample and lo_i >= 0 and hi_i < sample):
        return torch.stack([_full_kth(B, A, j, k, chunks) for j in range(M)])
    rows = torch.randint(m, (sample,), generator=g).to(B.device)
    cols = torch.randint(n, (sample,), generator=g).to(B.device)
    vals = (B.index_select(1, rows) * A.transpose(1, 2).index_select(1, cols)).sum(-1).abs_()  # [M, sample]
    lo_t = torch.kthvalue(vals, lo_i + 1, dim=1).values
    lo = lo_t.tolist()
    hi = torch.kthvalue(vals, hi_i + 1, dim=1).values.tolist()

    def scan(j: int, a: int, b: int) -> tuple[int, int, Any]:
        mag = chunk_product(B, A, j, a, b).abs_()
        return (j,) + band_of(mag, lo[j], hi[j])

    above = [0] * M
    bands: list[list[Any]] = [[] for _ in range(M)]
    for j, n_above, sel in run_chunks(scan, chunks, workers):
        above[j] += n_above
        bands[j].append(sel)
    out = torch.empty(M, dtype=B.dtype, device=B.device)
    for j in range(M):
        need = k - above[j]
        size = sum(len(p) for p in bands[j])
        out[j] = _kth_largest(bands[j], need) if 1 <= need <= size else _full_kth(B, A, j, k, chunks)
    return out


def band_of(mag: torch.Tensor, lo: float, hi: float) -> tuple[int, Any]:
    """(#entries of ``mag`` above ``hi``, the entries in [lo, hi]) for a chunk of magnitudes.

    On the CPU the comparisons and the selection run in numpy on the same memory: numpy compares into
    booleans ~14× faster than torch here (0.04 vs 0.57 ns per element, 1 thread, RESULTS-dense.md), and
    the two passes are all the scan does besides the product.  The selected values are the same floats
    either way (a selection, no arithmetic).
    """
    if mag.device.type == "cpu":
        x = mag.numpy()
        return int(np.count_nonzero(x > hi)), np.compress(((x >= lo) & (x <= hi)).ravel(), x.ravel())
    return int((mag > hi).sum()), mag[(mag >= lo) & (mag <= hi)]


def _kth_largest(parts: list[Any], k: int) -> Any:
    """The k-th largest value of the concatenated ``parts`` (1 ≤ k ≤ their size): numpy arrays from the CPU
    scan (``np.partition``, ~14× faster than ``torch.kthvalue`` on a 350k-element band), tensors otherwise."""
    if isinstance(parts[0], np.ndarray):
        band = np.concatenate(parts)
        return float(np.partition(band, band.size - k)[band.size - k])
    band = torch.cat(parts)
    return torch.kthvalue(band, band.numel() - k + 1).values


def _full_kth(B: torch.Tensor, A: torch.Tensor, j: int, k: int, chunks: Sequence[Chunk]) -> torch.Tensor:
    """k-th largest |ΔW| of module j of the batch, from the same chunk products as the combine."""
    mag = torch.cat([chunk_product(B, A, jj, a, b).abs_().flatten() for jj, a, b in chunks if jj == j])
    return torch.kthvalue(mag, mag.numel() - k + 1).values


# ---------------------------------------------------------------------------------------- sign election
def elect(xs: list[torch.Tensor], method: SignMethod) -> torch.Tensor:
    """The elected sign e (±1 per entry) of the tensors ``xs`` (not modified): sign of Σ x_i (``total``,
    summed in input order) or of Σ sign(x_i) (``frequency``), +1 on a tie.  Float ops only:
    e = sign(sign(mass) + ½) maps mass ≥ 0 (−0 included) to +1, mass < 0 to −1."""
    if method == "total":
        mass = xs[0].clone() if len(xs) == 1 else torch.add(xs[0], xs[1])
        for x in xs[2:]:
            mass.add_(x)
    else:
        mass = xs[0].sign()
        for x in xs[1:]:
            mass.add_(x.sign())
    return mass.sign_().add_(0.5).sign_()


def disjoint_mean(xs: list[torch.Tensor], method: SignMethod, out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES sign election and disjoint mean of the (weighted) tensors ``xs`` (consumed: modified in place).

    e = :func:`elect` (xs); result: e · Σ relu(e·x_i) / #{i: e·x_i > 0} — the mean of the entries agreeing
    with e (multiplying by ±1 is exact, so this is the textbook formula's value).  Written into ``out`` when given.
    """
    e = elect(xs, method)
    num = out if out is not None else torch.empty_like(xs[0])
    cnt = torch.empty_like(xs[0])
    for i, x in enumerate(xs):
        y = x.mul_(e).relu_()  # |x| where x agrees with e, else 0
        if i == 0:
            num.copy_(y)
            torch.sign(y, out=cnt)
        else:
            num.add_(y)
            cnt.add_(y.sign_())
    return num.mul_(e).div_(cnt.clamp_(min=1))


def disjoint_mean_unweighted(xs: list[torch.Tensor], weights: Sequence[float], method: SignMethod,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's rule (``merge_utils.ties``): the sign elected on the *unweighted* tensors ``xs`` (consumed),
    then the disjoint mean of the weighted entries w_i·x_i whose x_i agree with it.

    e = :func:`elect` (xs); result: e · Σ w_i relu(e·x_i) / #{i: e·x_i > 0} (= Σ_{agreeing} w_i x_i / count
    exactly, since e·(w_i·|x_i|) = w_i·x_i).  A negative weight's agreeing entries count with their sign
    flipped; a zero weight still votes and counts.
    """
    e = elect(xs, method)
    num = out if out is not None else torch.empty_like(xs[0])
    cnt = torch.empty_like(xs[0])
    for i, (x, w) in enumerate(zip(xs, weights)):
        y = x.mul_(e).relu_()
        if i == 0:
            torch.mul(y, w, out=num)
            torch.sign(y, out=cnt)
        else:
            num.add_(y, alpha=w)
            cnt.add_(y.sign_())
    return num.mul_(e).div_(cnt.clamp_(min=1))


# ---------------------------------------------------------------------------------------- the fused pass
def dense_combine_factors(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], *,
                          combine: Combine, density: float = 1.0, drop: Sequence[torch.Generator] | None = None,
                          scale: float = 1.0, workers: int = 1, sign_from: SignFrom = "weighted",
                          norms: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """D [M, d_out, d_in] = scale · combine_i(w_i · step_ρ(B_i A_i)) from the inputs' batched factors.

    ``step``: magnitude trim to ``density`` (exact per-module thresholds), or, with ``drop`` (one
    seeded CPU generator per module), DARE masks M_i ~ Bernoulli(ρ) drawn per module for the inputs in
    order over the whole [d_out, d_in] (the stream of PEFT's ``bernoulli(full_like(ΔW_i, ρ))``: uniform
    draws compared with ρ), rescaled by 1/ρ.  ``combine``: weighted sum (in input order), or TIES sign
    election (``total``/``frequency``) and disjoint mean, the sign elected on the weighted w_i·step_ρ(ΔW_i)
    or, with ``sign_from="unweighted"``, on step_ρ(ΔW_i) (PEFT's rule, :func:`disjoint_mean_unweighted`;
    DARE's 1/ρ is then a division, as PEFT's).  Besides D only one module's float masks
    (DARE) are held; each chunk goes through product, mask, weight and running sums in cache.
    ``norms`` ([M] float64, zeros): ‖D[j]‖² is added to it while each chunk is in cache (the same sums, in
    the same order, as :func:`algorithms.dense.sq_norms` on D).  ``out``: a [M, d_out, d_in] buffer to write D
    into (a batch driver reuses one: a fresh 46 MB tensor per module costs its page faults every time).
    """
    n_in = len(weights)
    B0, A0 = factors[0]
    M, m, _ = B0.shape
    n = A0.shape[2]
    dev, dtype = B0.device, B0.dtype
    chunks = row_chunks(M, m, n, dev)
    dare = drop is not None and density < 1
    thr: list[list[float]] | None = None  # per input: per-module hardshrink λ
    if drop is None and density < 1:
        if int(density * m * n) <= 0:
            return torch.zeros(M, m, n, dtype=dtype, device=dev) if out is None else out.zero_()
        thr = [lambdas(trim_thresholds(B, A, density, chunks, workers)) for B, A in factors]
    peft_rule = sign_from == "unweighted" and combine != "sum"
    mult = [1.0] * n_in if peft_rule else [w * (1.0 / density if dare else 1.0) for w in weights]
    D = torch.empty(M, m, n, dtype=dtype, device=dev) if out is None else out
    masks: list[torch.Tensor] = []

    def chunk(j: int, a: int, b: int) -> torch.Tensor | None:
        xs = []
        for i, (B, A) in enumerate(factors):
            x = chunk_product(B, A, j, a, b)
            if thr is not None:
                x = keep_at_least(x, thr[i][j], out=x)
            elif dare:
                x.mul_(masks[i][a:b])
                if peft_rule:
                    x.div_(density)
            if mult[i] != 1.0:
                x.mul_(mult[i])
            xs.append(x)
        dst = D[j, a:b]
        if combine == "sum":
            if n_in == 1:
                dst.copy_(xs[0])
            else:
                torch.add(xs[0], xs[1], out=dst)
            for x in xs[2:]:
                dst.add_(x)
        elif peft_rule:
            disjoint_mean_unweighted(xs, weights, combine, out=dst)
        else:
            disjoint_mean(xs, combine, out=dst)
        if scale != 1.0:
            dst.mul_(scale)
        return None if norms is None else chunk_sq_norm(dst)

    def run(cs: list[Chunk]) -> None:
        for (j, _, _), part in zip(cs, run_chunks(chunk, cs, workers)):
            if part is not None:
                norms[j] += part  # type: ignore[index]

    if not dare:
        run(chunks)
        return D
    for j in range(M):  # module j's masks, inputs in order (float 0/1: a float multiply per chunk)
        masks[:] = [torch.rand(m, n, generator=drop[j], dtype=torch.float32).lt_(density).to(device=dev, dtype=dtype)
                    for _ in range(n_in)]
        run([c for c in chunks if c[0] == j])
    return D
