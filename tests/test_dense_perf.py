"""The dense methods' fast paths (exact trim thresholds, fused sign election, subspace-iteration
refactorisation, batching) against straightforward references and PEFT's own merge utilities."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from mergekit_lora.algorithms.dense import (
    DenseParams,
    _mm,
    blas_view,
    dense_combine,
    disjoint_mean,
    refactor_batch,
    sq_norms,
    trim_thresholds,
)
from mergekit_lora.algorithms.elementwise import band_of, chunk_product, row_chunks
from mergekit_lora.algorithms.ties import TiesParams, ties_dense
from mergekit_lora.registry import ModuleContext, get_algorithm, parse_params
from mergekit_lora.threads import current, thread_policy
from mergekit_lora.units import RankUnits


def rand_units(m: int, n: int, r: int, seed: int, source: int = 0) -> RankUnits:
    g = torch.Generator().manual_seed(seed)
    return RankUnits.from_factors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), source=source)


@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.97])
def test_trim_threshold_is_exactly_the_kth_largest(density):
    # 3 modules of 400×800 = 320k entries: the sampled-bracket path (N > 4·65536)
    mods = [rand_units(400, 800, 4, seed=s) for s in range(3)]
    B = torch.stack([u.B for u in mods])
    A = torch.stack([u.A for u in mods])
    chunks = row_chunks(3, 400, 800)
    thr = trim_thresholds(B, A, density, chunks)
    k = int(density * 400 * 800)
    for j in range(3):  # the combine pass's products
        mag = torch.cat([chunk_product(B, A, jj, a, b).abs().flatten() for jj, a, b in chunks if jj == j])
        assert thr[j] == torch.kthvalue(mag, mag.numel() - k + 1).values
        assert int((mag >= thr[j]).sum()) >= k > int((mag > thr[j]).sum())


def test_trim_threshold_with_massive_ties_falls_back_exactly():
    # quantised factors: |ΔW| takes few distinct values, so brackets collapse onto ties
    g = torch.Generator().manual_seed(3)
    B = torch.randint(-1, 2, (1, 600, 2), generator=g).float()
    A = torch.randint(-1, 2, (1, 2, 700), generator=g).float()
    chunks = row_chunks(1, 600, 700)
    for density in (0.2, 0.5, 0.8):
        k = int(density * 600 * 700)
        mag = (B[0] @ A[0]).abs().flatten()
        assert trim_thresholds(B, A, density, chunks)[0] == torch.kthvalue(mag, mag.numel() - k + 1).values


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_fused_sign_election_equals_peft_disjoint_merge(method):
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(5, 30, 40, generator=g) * (torch.rand(5, 30, 40, generator=g) > 0.4)
    mask = merge_utils.calculate_majority_sign_mask(xs, method=method)
    ref = merge_utils.disjoint_merge(xs, mask)
    torch.testing.assert_close(disjoint_mean([x.clone() for x in xs], method), ref, rtol=1e-6, atol=1e-7)


def test_ties_dense_equals_peft_ties_on_large_modules():
    # big enough for the sampled trim thresholds and several row chunks
    units = [rand_units(300, 1000, 8, seed=10 + i, source=i) for i in range(3)]
    ours = ties_dense([units], [1.0, 1.0, 1.0], TiesParams(density=0.4), [ModuleContext("m", 0, torch.device("cpu"))],
                      torch.float32)[0]
    deltas = torch.stack([u.delta() for u in units])
    ref = merge_utils.ties(deltas, torch.ones(3), 0.4, "total")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [200, 300])
def test_subspace_iteration_matches_the_exact_rank_k_svd(m):
    n = int(2.75 * m)
    units = [rand_units(m, n, 16, seed=20 + i, source=i) for i in range(4)]
    D = ties_dense([units], [0.25] * 4, TiesParams(density=0.5), [ModuleContext("m", 0, torch.device("cpu"))],
                   torch.float32)
    start = torch.cat([u.B for u in units], 1)[None]
    gens = [torch.Generator().manual_seed(0)]
    Be, Ae, e2e, n2, _ = refactor_batch(D, 16, DenseParams(density=1.0, exact_svd=True), start, gens)
    Bi, Ai, e2i, n2i, _ = refactor_batch(D, 16, DenseParams(density=1.0), start, gens)  # default: iterative here
    exact = (Be[0] @ Ae[0]).double()
    assert float(((Bi[0] @ Ai[0]).double() - exact).norm() / exact.norm()) <= 1e-3
    # the reported error ‖D − D_k‖² = ‖D‖² − Σσ² agrees with a dense computation
    dense_err2 = float((D[0].double() - (Bi[0] @ Ai[0]).double()).square().sum())
    assert abs(float(e2i[0]) - dense_err2) <= 1e-4 * float(n2i[0])
    assert torch.allclose(n2, n2i) and abs(float(n2[0]) - float(D.double().square().sum())) <= 1e-6 * float(n2[0])


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.6}),
                                           ("magnitude_prune", {"density": 0.3}), ("dare_linear", {"density": 0.5})])
def test_batched_merge_equals_module_by_module(method, params):
    algo = get_algorithm(method)
    p = parse_params(algo, params)
    mods = [[rand_units(180, 300, 4, seed=100 * j + i, source=i) for i in range(3)] for j in range(3)]
    ctxs = [ModuleContext(f"layers.{j}.q", 7, torch.device("cpu")) for j in range(3)]
    w = [0.5, -0.3, 1.0]
    batched = algo.merge_batch(mods, [w] * 3, p, ctxs)
    for j in range(3):
        single = algo.merge_module(mods[j], w, p, ctxs[j])
        torch.testing.assert_close(batched[j].units.delta(), single.units.delta(), rtol=1e-4, atol=1e-5)


def test_dense_bytes_do_not_depend_on_the_thread_count(monkeypatch):
    import mergekit_lora.threads as threads

    monkeypatch.setattr(threads, "PARALLEL_MIN_FLOPS", 0.0)  # every product and the chunk pool get the budget
    units = [rand_units(300, 900, 8, seed=40 + i, source=i) for i in range(3)]
    algo = get_algorithm("ties")
    p = parse_params(algo, {"density": 0.5})
    outs = []
    for n in (1, 2):
        with thread_policy(n):
            ctx = ModuleContext("m", 0, torch.device("cpu"), threads.current())  # the budget, as execute hands it
            assert ctx.threads.workers_for(1.0) == n
            u = algo.merge_module(units, [1.0, 1.0, 1.0], p, ctx).units
        outs.append((u.A.clone(), u.B.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_dense_combine_trims_everything_when_density_rounds_to_zero():
    units = [rand_units(4, 5, 2, seed=1)]
    D = dense_combine([units], [1.0], torch.float32, combine="sum", density=0.01)
    assert D.shape == (1, 4, 5) and not D.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hardshrink_trim_keeps_exactly_the_entries_at_or_above_the_threshold(dtype):
    from mergekit_lora.algorithms.elementwise import keep_at_least, lambdas

    g = torch.Generator().manual_seed(8)
    x = torch.randn(200, 300, generator=g).to(dtype)
    x[0, :4] = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=dtype)
    # thresholds equal to entries of x (as the trim's are), and 0 (keep everything)
    ts = torch.stack([x.abs().flatten()[7], x.abs().flatten()[1234], torch.tensor(1.0, dtype=dtype),
                      torch.tensor(0.0, dtype=dtype)])
    for t, lam in zip(ts, lambdas(ts)):
        ref = x * (x.abs() >= t)
        out = keep_at_least(x, lam)
        assert torch.equal(out, ref) and out.dtype == dtype
        assert int((out != 0).sum()) == int(((x.abs() >= t) & (x != 0)).sum())


def test_blas_view_keeps_a_transposed_view_and_its_product_bits():
    g = torch.Generator().manual_seed(3)
    D = torch.randn(2, 300, 700, generator=g)
    Q = torch.randn(2, 300, 24, generator=g)
    Dt = D.transpose(1, 2)
    assert blas_view(Dt).data_ptr() == D.data_ptr()  # no copy of the big operand
    with thread_policy(2):
        viewed = _mm(Dt, Q, current())  # the budget execute hands the algorithms
    assert torch.equal(viewed, torch.bmm(Dt.contiguous(), Q))
    odd = D[:, ::2, ::2]  # neither row- nor column-major: copied
    assert blas_view(odd).is_contiguous()


@pytest.mark.parametrize("combine,density", [("total", 0.5), ("sum", 0.3), ("frequency", 1.0)])
def test_norms_summed_while_forming_d_equal_the_separate_pass(combine, density):
    # the refactorisation's ‖D‖² comes from the combine pass: the same sums, in the same order, bit for bit
    mods = [[rand_units(700, 500, 4, seed=10 * j + i, source=i) for i in range(3)] for j in range(2)]
    norms = torch.zeros(2, dtype=torch.float64)
    D = dense_combine(mods, [0.5, -0.3, 0.8], torch.float32, combine=combine, density=density, norms=norms)
    assert torch.equal(norms, sq_norms(D))
    assert torch.allclose(norms, D.double().square().sum((1, 2)), rtol=1e-6)


def test_band_of_counts_above_and_selects_the_bracket_like_torch():
    g = torch.Generator().manual_seed(8)
    mag = (torch.randn(300, 4, generator=g) @ torch.randn(4, 500, generator=g)).abs_()
    mag[0, :10] = 0.0  # zeros belong to a bracket starting at 0
    for lo, hi in ((0.4, 0.6), (0.0, 0.05), (float(mag[5, 7]), float(mag[5, 7]))):
        n_above, band = band_of(mag, lo, hi)
        assert n_above == int((mag > hi).sum())
        want = mag[(mag >= lo) & (mag <= hi)]
        assert torch.equal(torch.from_numpy(band), want) and want.numel() > 0


@pytest.mark.parametrize("n_in,density,iters_range", [(2, 0.9, (1, 3)), (8, 0.1, (4, 6))])
def test_adaptive_power_iterations_stop_when_the_spectrum_says_so(n_in, density, iters_range):
    # the default iterates each module until (σ̂_q/σ̂_k)^(2t) ≤ CONVERGENCE_BOUND: a clear gap (2 inputs) stops
    # early, a flat spectrum (8 inputs at density 0.1) iterates longer; both end near the exact rank-k SVD
    m, n = 400, 1100
    units = [rand_units(m, n, 16, seed=40 + i, source=i) for i in range(n_in)]
    D = ties_dense([units], [1.0 / n_in] * n_in, TiesParams(density=density),
                   [ModuleContext("m", 0, torch.device("cpu"))], torch.float32)
    start = torch.cat([u.B for u in units], 1)[None]
    gens = [torch.Generator().manual_seed(0)]
    Be, Ae, *_ = refactor_batch(D, 16, DenseParams(density=1.0, exact_svd=True), start, gens)
    exact = (Be[0] @ Ae[0]).double()
    Bi, Ai, _, _, iters = refactor_batch(D, 16, DenseParams(density=1.0), start, gens)
    err = float(((Bi[0] @ Ai[0]).double() - exact).norm() / exact.norm())
    assert iters_range[0] <= iters[0] <= iters_range[1]
    assert err <= 5e-4
    *_, fixed = refactor_batch(D, 16, DenseParams(density=1.0, niter=2), start, gens)
    assert fixed == [2]
