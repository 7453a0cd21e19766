"""The thread policy's decisions and the cheap fidelity paths (exact methods, float32 Grams)."""

from __future__ import annotations

import math

import pytest
import torch

import mergekit_lora.threads as threads
from mergekit_lora.fidelity import ModuleFidelity, exact_fidelity, module_fidelity, summarize, weighted_target
from mergekit_lora.registry import ModuleContext, get_algorithm, parse_params
from mergekit_lora.units import RankUnits


def test_budget_prefers_the_option_then_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.thread_budget(5) == 5
    assert threads.thread_budget() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.thread_budget() == threads.usable_cores()
    with pytest.raises(ValueError):
        threads.thread_budget(0)


def test_policy_runs_small_ops_on_one_thread_and_big_ones_on_the_budget(monkeypatch):
    monkeypatch.delenv("LORAMERGE_THREAD_POLICY", raising=False)
    before = torch.get_num_threads()
    with threads.thread_policy(3) as budget:
        assert budget == 3 and torch.get_num_threads() == 1
        assert threads.current().workers_for(1e3) == 1 and threads.current().workers_for(1e12) == 3
        with threads.parallel_for(1e12) as n:
            assert n == 3 and torch.get_num_threads() == 3
        with threads.parallel_for(1e12), threads.single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
        with threads.thread_policy() as inner:  # nested: keeps the outer budget
            assert inner == 3
    assert torch.get_num_threads() == before


def test_barrier_threads_are_the_idle_cpus_within_one_and_the_budget():
    assert threads.barrier_threads(2, 2, 0) == 2
    assert threads.barrier_threads(2, 2, 1) == 1
    assert threads.barrier_threads(2, 2, 2) == 1  # both cores taken by others: one thread, never 0
    assert threads.barrier_threads(8, 16, 9) == 7
    assert threads.barrier_threads(4, 64, 30) == 4  # host-wide load on a big host: the budget caps
    assert threads.barrier_threads(4, 4, -3) == 4  # a racy negative count is read as 0


def test_others_running_excludes_this_process():
    others = threads.others_running()
    assert others is None or others >= 0
    assert threads._own_running_threads() >= 1  # at least the thread reading /proc


def test_parallel_for_is_trimmed_by_load_only_when_the_budget_is_implicit(monkeypatch):
    monkeypatch.delenv("LORAMERGE_THREAD_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    load = {"others": 2}
    monkeypatch.setattr(threads, "others_running", lambda: load["others"])
    with threads.thread_policy() as budget:  # implicit budget: load-aware
        assert budget == 2
        assert threads.current().workers_for(1e12) == 1  # chunk pools are trimmed too
        with threads.parallel_for(1e12) as n:
            assert n == 1 and torch.get_num_threads() == 1
        load["others"] = 0
        assert threads.current().gemm_workers_for(1e12) == 2  # re-read at every call
        assert threads.current().gemm_workers_for(1e3) == 1  # small ops stay single-threaded
        load["others"] = None  # no /proc: the budget
        assert threads.current().gemm_workers_for(1e12) == 2
        load["others"] = 1
        with threads.thread_policy() as inner:  # nested without threads: still load-aware
            assert inner == 2 and threads.current().gemm_workers_for(1e12) == 1
        with threads.thread_policy(2):  # explicit option: no trimming
            assert threads.current().gemm_workers_for(1e12) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with threads.thread_policy():  # explicit OMP_NUM_THREADS: no trimming
        with threads.parallel_for(1e12) as n:
            assert n == 2 and torch.get_num_threads() == 2


def test_implicit_budgets_above_two_give_gemms_two_threads(monkeypatch):
    # MKL's GEMM bits differ between 1 and ≥ 3 threads for skinny products: neither the load nor the core
    # count may pick a count above 2; an explicit budget is honoured
    monkeypatch.delenv("LORAMERGE_THREAD_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "others_running", lambda: 3)
    with threads.thread_policy():
        assert threads.current().gemm_workers_for(1e12) == 1 and threads.current().gemm_workers_for(1e3) == 1  # 3 others busy
        assert threads.current().workers_for(1e12) == 1  # the chunk pool's size never changes the bytes: trimmed
    monkeypatch.setattr(threads, "others_running", lambda: 0)
    with threads.thread_policy():
        assert threads.current().gemm_workers_for(1e12) == 2 and threads.current().workers_for(1e12) == 4  # idle: pool 4, GEMM 2
    with threads.thread_policy(threads=4):
        assert threads.current().gemm_workers_for(1e12) == 4  # explicit: as given


def test_policy_off_leaves_torch_alone(monkeypatch):
    monkeypatch.setenv("LORAMERGE_THREAD_POLICY", "off")
    before = torch.get_num_threads()
    with threads.thread_policy(1), threads.parallel_for(1e12), threads.single_thread():
        assert torch.get_num_threads() == before


def _units(r: int, seed: int, m: int = 40, n: int = 30) -> RankUnits:
    g = torch.Generator().manual_seed(seed)
    return RankUnits.from_factors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g), source=seed)


def test_exact_methods_report_their_zero_error_without_measuring_anything():
    us, w = [_units(4, 1), _units(3, 2)], [0.5, -1.5]
    ctx = ModuleContext("m", 0, torch.device("cpu"))
    for name, params in (("linear", {}), ("cat", {})):
        algo = get_algorithm(name)
        out = algo.merge_module(us, w, parse_params(algo, params), ctx)
        assert out.fidelity is not None and out.fidelity.error_norm == 0.0, name
    algo = get_algorithm("linear")
    assert algo.merge_module(us, w, parse_params(algo, {"rank": 2}), ctx).fidelity is None  # re-ranked: measured
    target = weighted_target(us, w)
    row = exact_fidelity("m", target)
    assert row.error_norm == 0.0 and math.isnan(row.target_norm)  # ‖target‖ needs an N×N Gram: not measured
    # a group of exact rows summarises to error 0 / energy 1; mixed with a measured nonzero error: not measurable
    rows = [exact_fidelity("layers.0.q", target), exact_fidelity("layers.1.q", target)]
    assert summarize(rows)["overall"] == {"modules": 2, "rel_error": 0.0, "energy_ratio": 1.0}
    assert math.isnan(summarize(rows + [ModuleFidelity("layers.0.v", 1.0, 1.0, 0.5)])["overall"]["rel_error"])


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_svd_fidelity_row_from_the_spectrum_equals_the_factor_space_measurement(rank):
    units = [_units(4, 1), _units(3, 2)]
    algo = get_algorithm("svd")
    out = algo.merge_module(units, [0.7, -1.2], parse_params(algo, {"rank": rank}),
                            ModuleContext("m", 0, torch.device("cpu")))
    ref = module_fidelity("m", out.units, weighted_target(units, [0.7, -1.2]))
    for a, b in ((out.fidelity.error_norm, ref.error_norm), (out.fidelity.target_norm, ref.target_norm),
                 (out.fidelity.merged_norm, ref.merged_norm)):
        assert abs(a - b) <= 1e-4 * ref.target_norm


@pytest.mark.parametrize("noise", [0.5, 1e-2, 1e-6])
def test_module_fidelity_matches_dense_float64_at_every_error_level(noise):
    target = weighted_target([_units(4, 1), _units(3, 2)], [0.5, 1.0])
    merged = target.with_factors(target.A + noise * torch.randn_like(target.A), target.B)
    row = module_fidelity("m", merged, target)
    def d64(u: RankUnits) -> torch.Tensor:
        return u.B.double() @ u.A.double()

    e = float((d64(merged) - d64(target)).norm())
    assert abs(row.error_norm - e) <= 1e-3 * e + 1e-7 * float(d64(target).norm())


@pytest.mark.parametrize("name, params", [("lego", {"k": 8}), ("ties", {"density": 0.5})])
def test_load_trimmed_thread_counts_give_the_same_bytes(monkeypatch, name, params):
    # every product gets threads; 2 "cores" with 0 or 2 other runnable threads: 2 vs 1 GEMM threads
    monkeypatch.delenv("LORAMERGE_THREAD_POLICY", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "PARALLEL_MIN_FLOPS", 0.0)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    algo = get_algorithm(name)
    p = parse_params(algo, params)
    us = [_units(8, 10 + i, m=300, n=500) for i in range(4)]
    outs = []
    for others in (0, 2):
        monkeypatch.setattr(threads, "others_running", lambda o=others: o)
        with threads.thread_policy():
            ctx = ModuleContext("m", 0, torch.device("cpu"), threads.current())  # the budget, as execute hands it
            assert ctx.threads.gemm_workers_for(1.0) == 2 - others // 2
            u = algo.merge_module(us, [0.25] * 4, p, ctx).units
        outs.append((u.A.clone(), u.B.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_matmul_bits_do_not_depend_on_the_thread_count_and_equal_the_product(monkeypatch):
    # MKL's threaded GEMM rounds 300×900 @ 900×16 differently at 1 and 2 threads on AVX-512 CPUs: the
    # policy's matmul cuts big products into fixed row blocks, each a single-threaded GEMM
    monkeypatch.delenv("LORAMERGE_THREAD_POLICY", raising=False)
    g = torch.Generator().manual_seed(3)
    cases = (((300, 900), (900, 16), "rows"), ((3, 700, 900), (3, 900, 24), "rows"),
             ((2, 72, 3000), (2, 3000, 1300), "cols"))  # a short, wide X cut into column blocks of Y (Qᵀ D)
    for xs, ys, by in cases:
        X, Y = torch.randn(*xs, generator=g), torch.randn(*ys, generator=g)
        outs = []
        for n in (1, 2, 3):
            with threads.thread_policy(n):
                outs.append(threads.current().matmul(X, Y, by=by))
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        assert torch.allclose(outs[0], (X.double() @ Y.double()).float(), rtol=1e-4, atol=1e-3)
