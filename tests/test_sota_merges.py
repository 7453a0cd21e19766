"""The 2025 LoRA merges in factor space (core TIES/DARE/magnitude_prune, KnOTS, TSV-M, Iso-C, Iso-CTS)
against dense float64 oracles (``sota_oracles.py``: the reference procedures on m×n matrices).

Sizes: m=40, n=32, T=3 tasks with ranks (2, 3, 4) (mixed) or (3, 3, 3); weights ≠ 1 and one negative.
The factor-space ΔW must equal the oracle's to ≤ 1e-6 relative Frobenius (measured: ~1e-14).
Full-space TSV / Iso depend on arbitrary null-space completions on LoRAs: the oracles are the core /
"clean" variants (each task's r_t triplets; Iso over the sum's R = Σ r_t directions).
"""

from __future__ import annotations

import numpy as np
import pytest
import sota_oracles as O
import torch

from mergekit_lora.registry import ModuleContext, get_algorithm, parse_params
from mergekit_lora.units import RankUnits

M, N = 40, 32
CASES = {"mixed": ((2, 3, 4), (0.8, 1.3, -0.6)), "equal": ((3, 3, 3), (1.0, 1.0, 1.0))}
TOL = 1e-6


def make_units(ranks, seed=0, dtype=torch.float64, m=M, n=N):
    g = torch.Generator().manual_seed(seed)
    return [RankUnits.from_factors(torch.randn(r, n, generator=g, dtype=dtype),
                                   torch.randn(m, r, generator=g, dtype=dtype) * (0.5 + i), source=i)
            for i, r in enumerate(ranks)]


def ctx(name="layers.0.q_proj", seed=5):
    return ModuleContext(name, seed, torch.device("cpu"))


def run(method, units, weights, c=None, **params):
    algo = get_algorithm(method)
    return algo.merge_module(units, list(weights), parse_params(algo, params), c or ctx())


def ours(method, units, weights, c=None, **params):
    return run(method, units, weights, c, **params).units.delta().double().numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(params=list(CASES))
def case(request):
    ranks, w = CASES[request.param]
    return make_units(ranks, seed=len(request.param)), list(w)


# ---------------------------------------------------------------------------------------- core space
CORE = {  # method, params, oracle on the core matrices
    "ties": (dict(density=0.3), lambda Ms: O.ties(Ms, 0.3)),
    "ties-freq-lambda": (dict(density=0.5, majority_sign="frequency", **{"lambda": 0.7}),
                         lambda Ms: O.ties(Ms, 0.5, "frequency", 0.7)),
    "magnitude_prune": (dict(density=0.4), lambda Ms: sum(O.trim(x, 0.4) for x in Ms)),
}


@pytest.mark.parametrize("name", list(CORE))
def test_core_elementwise_equals_dense_oracle(case, name):
    units, w = case
    params, fn = CORE[name]
    got = ours(name.split("-")[0], units, w, space="core", **params)
    want = O.core_merge(units, w, fn)
    assert rel(got, want) < TOL, rel(got, want)
    # the naive core (bare QR bases, or the sum's SVD basis) is another method: the basis matters
    Bs = np.hstack([wt * u.B.numpy() for u, wt in zip(units, w)])
    As = np.vstack([u.A.numpy() for u in units])
    QB, QA = np.linalg.qr(Bs)[0], np.linalg.qr(As.T)[0]
    naive = QB @ fn([QB.T @ d @ QA for d in O.dense(units, w)]) @ QA.T
    assert rel(naive, want) > 1e-2


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_core_dare_equals_dense_oracle_with_the_same_masks(case, method):
    units, w = case
    gen = ctx().generator("dare")
    comb = (lambda xs: sum(xs)) if method == "dare_linear" else O.elect_and_mean
    want = O.core_merge(units, w, lambda Ms: comb(O.dare(Ms, 0.5, gen)))
    got = ours(method, units, w, space="core", density=0.5)
    assert rel(got, want) < TOL
    assert rel(ours(method, units, w, ctx(seed=6), space="core", density=0.5), want) > 0.05  # another seed


@pytest.mark.parametrize("method", ["magnitude_prune", "dare_linear"])
def test_core_space_is_lossless_for_linear_merges(case, method):
    """Density 1: core magnitude_prune / dare_linear are Σ w_t ΔW_t exactly (Core Space is lossless)."""
    units, w = case
    got = ours(method, units, w, space="core", density=1.0)
    assert rel(got, sum(O.dense(units, w))) < 1e-12
    assert run(method, units, w, space="core", density=1.0).units.rank == sum(u.rank for u in units)
    # TIES at density 1 on one input: the disjoint mean of one task is the task
    assert rel(ours("ties", units[2:], [0.5], space="core", density=1.0), O.dense(units[2:], [0.5])[0]) < 1e-12


def test_core_ties_default_rank_and_truncation(case):
    units, w = case
    R = sum(u.rank for u in units)
    full = ours("ties", units, w, space="core", density=0.3)
    assert np.linalg.matrix_rank(full) == R  # trimming fills the core: rank R, not max rᵢ
    for k in (1, 4):
        got = run("ties", units, w, space="core", density=0.3, rank=k)
        u, s, vh = O.svd(full)
        assert got.units.rank == k
        assert rel(got.units.delta().numpy(), (u[:, :k] * s[:k]) @ vh[:k]) < TOL
        assert got.notes["trunc_err2"] == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9)


def test_full_space_default_is_unchanged():
    units = make_units((3, 3, 3), dtype=torch.float32)
    algo = get_algorithm("ties")
    assert parse_params(algo, {"density": 0.5}).space == "full"
    assert run("ties", units, [1.0] * 3, density=0.5).units.rank == 3


# ---------------------------------------------------------------------------------------- KnOTS
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_knots_ties_equals_dense_oracle(case, density):
    units, w = case
    got = ours("knots_ties", units, w, density=density)
    want = O.knots(units, w, lambda Xs: O.ties(Xs, density))
    assert rel(got, want) < TOL, rel(got, want)
    # pruning decided on diag(s)V_t, not on V_t (CORE's variant) — a different result when trimming
    if density < 1:
        ds = O.dense(units, w)
        U, s, Vh = O.svd(np.hstack(ds))
        k = sum(u.rank for u in units)
        Vs = [Vh[:k, t * N:(t + 1) * N] for t in range(3)]
        on_v = U[:, :k] @ np.diag(s[:k]) @ O.ties(Vs, density)
        assert rel(on_v, want) > 1e-2


def test_knots_ties_at_density_one_is_sign_election_and_disjoint_mean(case):
    units, w = case
    got = ours("knots_ties", units, w, density=1.0)  # no trim
    want = O.knots(units, w, O.elect_and_mean)
    assert rel(got, want) < TOL
    # one input: the disjoint mean of one task is the task itself
    assert rel(ours("knots_ties", units[:1], [0.5], density=1.0), O.dense(units[:1], [0.5])[0]) < 1e-12


def test_knots_dare_ties_equals_dense_oracle_with_the_same_masks(case):
    units, w = case
    gen = ctx().generator("dare")
    want = O.knots(units, w, lambda Xs: O.elect_and_mean(O.dare(Xs, 0.4, gen)))
    got = ours("knots_dare_ties", units, w, density=0.4)
    assert rel(got, want) < TOL
    assert rel(ours("knots_dare_ties", units, w, ctx(seed=9), density=0.4), want) > 0.05


def test_knots_rank_truncation_is_the_exact_svd_truncation(case):
    units, w = case
    full = ours("knots_ties", units, w, density=0.5)
    u, s, vh = O.svd(full)
    got = run("knots_ties", units, w, density=0.5, rank=3)
    assert got.units.rank == 3 and got.notes["knots_rank"] == sum(x.rank for x in units)
    assert rel(got.units.delta().numpy(), (u[:, :3] * s[:3]) @ vh[:3]) < TOL


# ---------------------------------------------------------------------------------------- TSV, Iso
def test_tsv_equals_clean_dense_oracle(case):
    units, w = case
    got = run("tsv", units, w)
    assert got.units.rank == sum(u.rank for u in units)
    assert rel(got.units.delta().numpy(), O.tsv(units, w)) < TOL
    # one task: polar factors of orthonormal blocks are the blocks: TSV returns the task
    assert rel(ours("tsv", units[1:2], [1.5]), O.dense(units[1:2], [1.5])[0]) < 1e-12
    # and the core variant is the reference's procedure on the core matrices (red = R/T = r when ranks are equal)
    if len({u.rank for u in units}) == 1:
        def ref_core(Ms):
            red = int(min(Ms[0].shape) / len(Ms))
            sv = [O.svd(x) for x in Ms]
            U = np.hstack([u[:, :red] for u, _, _ in sv])
            V = np.vstack([vh[:red] for _, _, vh in sv])
            S = np.concatenate([s[:red] for _, s, _ in sv])
            return O.polar(U) @ np.diag(S) @ O.polar(V.T).T
        assert rel(got.units.delta().numpy(), O.core_merge(units, w, ref_core)) < TOL


@pytest.mark.parametrize("rank", [None, 4])
def test_iso_c_equals_dense_oracle(case, rank):
    units, w = case
    got = run("iso_c", units, w, rank=rank)
    assert rel(got.units.delta().numpy(), O.iso_c(units, w, rank)) < TOL
    s = np.linalg.svd(got.units.delta().numpy(), compute_uv=False)
    k = rank or sum(u.rank for u in units)
    assert np.allclose(s[:k], s[0], rtol=1e-9) and s[k] < 1e-9 * s[0]  # a flat spectrum of rank k


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_equals_dense_oracle(case, fraction):
    units, w = case
    got = ours("iso_cts", units, w, common_fraction=fraction)
    assert rel(got, O.iso_cts(units, w, fraction)) < TOL
    assert rel(got, O.iso_c(units, w)) > 1e-3  # the task-specific directions change the result


@pytest.mark.parametrize("method,params", [("tsv", {}), ("iso_c", {}), ("iso_cts", {}), ("knots_ties", {}),
                                           ("ties", {"space": "core", "density": 0.3})])
def test_merges_are_homogeneous_in_the_weights(case, method, params):
    """Scaling every weight by c scales the merge by c (the global α belongs to the pipeline's scale)."""
    units, w = case
    a = ours(method, units, w, **params)
    b = ours(method, units, [2.5 * x for x in w], **params)
    assert rel(b, 2.5 * a) < TOL


def test_lora_scale_is_folded_before_merging():
    """from_factors(scale=s) folds alpha/r into B: merging it equals merging B·s with scale 1."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(3, N, generator=g, dtype=torch.float64), torch.randn(M, 3, generator=g, dtype=torch.float64)
    other = make_units((2,), seed=4)[0]
    a = ours("tsv", [RankUnits.from_factors(A, B, scale=4.0), other], [1.0, 1.0])
    b = ours("tsv", [RankUnits.from_factors(A, 4.0 * B), other], [1.0, 1.0])
    assert rel(a, b) < 1e-12


@pytest.mark.parametrize("method,params", [("iso_c", {}), ("tsv", {}), ("knots_ties", {"density": 0.5}),
                                           ("ties", {"space": "core", "density": 0.5})])
def test_float32_inputs_give_float32_factors_close_to_the_oracle(method, params):
    units = make_units((4, 4), seed=7, dtype=torch.float32)
    res = run(method, units, [0.5, 0.5], **params)
    assert res.units.A.dtype == torch.float32 and res.units.B.dtype == torch.float32
    want = {"iso_c": lambda: O.iso_c(units, [0.5, 0.5]), "tsv": lambda: O.tsv(units, [0.5, 0.5]),
            "knots_ties": lambda: O.knots(units, [0.5, 0.5], lambda Xs: O.ties(Xs, 0.5)),
            "ties": lambda: O.core_merge(units, [0.5, 0.5], lambda Ms: O.ties(Ms, 0.5))}[method]()
    assert rel(res.units.delta().double().numpy(), want) < 1e-5


@pytest.mark.parametrize("method,params", [("tsv", {}), ("knots_ties", {"density": 1.0}), ("iso_cts", {}),
                                           ("ties", {"space": "core", "density": 0.4}), ("iso_c", {})])
def test_degenerate_inputs_identical_tasks_and_zeros(method, params):
    """Two identical tasks: TIES (whose trim keeps the duplicates' 3×3 core support here) / KnOTS (density 1) / TSV
    give the task back (TSV's polar factor over the range only, not
    LAPACK's arbitrary null-space completions), Iso-CTS equals Iso-C (nothing task-specific is left);
    all-zero inputs give zeros, no NaN."""
    u = make_units((3,), seed=11)[0]
    got = ours(method, [u, u], [1.0, 1.0], **params)
    if method in ("iso_c", "iso_cts"):  # the sum has rank 3 < R = 6: mean over R, the 3 null directions left out
        U, S, Vh = O.svd(2 * O.dense([u], [1.0])[0])
        assert rel(got, S[:6].mean() * U[:, :3] @ Vh[:3]) < TOL
    else:
        assert rel(got, O.dense([u], [1.0])[0]) < TOL
    zero = ours(method, [u.scaled(0.0), u.scaled(0.0)], [1.0, 1.0], **params)
    assert np.isfinite(zero).all() and not zero.any()


def test_knots_ties_frequency_sign_equals_dense_oracle(case):
    """Frequency election has ties (equal counts -> +1), so it depends on the basis signs: both sides use the
    sign convention 'largest-|entry| of each u_i positive'."""
    units, w = case
    got = ours("knots_ties", units, w, density=0.6, majority_sign="frequency")
    assert rel(got, O.knots(units, w, lambda Xs: O.ties(Xs, 0.6, "frequency"))) < TOL


def test_merge_batch_equals_module_by_module():
    """The driver hands same-shape modules together (core space goes through DenseAlgorithm.merge_batch)."""
    mods = [make_units((2, 3), seed=s) for s in (20, 21)]
    ctxs = [ctx("layers.0.q_proj"), ctx("layers.1.q_proj")]
    for method, params in [("ties", {"space": "core", "density": 0.4}), ("dare_ties", {"space": "core", "density": 0.5}),
                           ("iso_c", {}), ("knots_dare_ties", {})]:
        algo = get_algorithm(method)
        p = parse_params(algo, params)
        batch = algo.merge_batch(mods, [[0.7, 0.4]] * 2, p, ctxs)
        for u, c, b in zip(mods, ctxs, batch):
            one = algo.merge_module(u, [0.7, 0.4], p, c)
            assert torch.equal(one.units.A, b.units.A) and torch.equal(one.units.B, b.units.B), method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,params", [("ties", {"space": "core", "density": 0.3}), ("knots_ties", {"density": 0.5}),
                                           ("knots_dare_ties", {}), ("tsv", {}), ("iso_c", {}), ("iso_cts", {})])
def test_cuda_equals_cpu(method, params):
    units = make_units((2, 3, 4), seed=3)
    cpu = ours(method, units, [0.8, 1.3, -0.6], **params)
    cuda_units = [u.to("cuda") for u in units]
    c = ModuleContext("layers.0.q_proj", 5, torch.device("cuda"))
    gpu = run(method, cuda_units, [0.8, 1.3, -0.6], c, **params).units.delta().double().cpu().numpy()
    assert rel(gpu, cpu) < 1e-6


# ---------------------------------------------------------------------------------------- end to end
def test_iso_c_through_the_cli_writes_a_loadable_adapter(tmp_path):
    """``loramerge merge -m iso_c`` on PEFT folders (mixed ranks, alpha ≠ r): the written adapter loads in
    PeftModel, its logits are base + ΔW', and ΔW' equals the dense oracle on PEFT's own ΔW's."""
    from helpers import make_peft_adapter, outputs, peft_deltas, peft_model, tiny_llama

    from mergekit_lora.cli.main import app

    a = make_peft_adapter(tmp_path / "a", r=4, lora_alpha=8, seed=31, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(tmp_path / "b", r=2, lora_alpha=6, seed=32, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "out"
    try:
        app(["merge", str(a), str(b), "-m", "iso_c", "--weights", "0.6,0.9", "--scale", "none", "-o", str(out)],
            standalone_mode=False)
    except SystemExit as e:
        assert not e.code
    da, db, dm = peft_deltas(a), peft_deltas(b), peft_deltas(out)
    assert set(dm) == set(da)
    for n, d in dm.items():
        s = [np.linalg.svd(x[n].double().numpy(), full_matrices=False) for x in (da, db)]
        units = [RankUnits.from_factors(torch.tensor(vh[:r]), torch.tensor(u[:, :r] * sv[:r]))
                 for (u, sv, vh), r in zip(s, (4, 2))]
        assert rel(d.double().numpy(), O.iso_c(units, [0.6, 0.9])) < 1e-5, n
    base = tiny_llama()
    sd = base.state_dict()
    with torch.no_grad():
        for n, d in dm.items():
            sd[n + ".weight"] += d
    base.load_state_dict(sd)
    got, want = outputs(peft_model(out), "llama"), outputs(base, "llama")
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert "isotropic" in (out / "README.md").read_text()
