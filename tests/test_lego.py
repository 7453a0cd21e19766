"""LoRA-LEGO: the paper's properties, planted clusters, reweighting optimality, PEFT loading, CLI."""

import json
import math

import pytest
import torch
from helpers import rel
from sklearn.metrics import adjusted_rand_score

from mergekit_lora import load_adapter, merge
from mergekit_lora.registry import ModuleContext, get_algorithm, parse_params
from mergekit_lora.threads import current, thread_policy
from mergekit_lora.units import RankUnits

_lego = get_algorithm("lego")


class _UnitsOf:
    """The LEGO algorithm, returning the merged units of its MergedModule results."""

    def merge_module(self, *args):
        return _lego.merge_module(*args).units

    def merge_batch(self, *args):
        return [m.units for m in _lego.merge_batch(*args)]


lego = _UnitsOf()
CTX = ModuleContext("layers.0.q_proj", 0, torch.device("cpu"))


def P(**kw):
    return parse_params(_lego, kw)


def rand_units(r, d_out=10, d_in=8, seed=0, source=0):
    g = torch.Generator().manual_seed(seed)
    return RankUnits.from_factors(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                                  torch.randn(d_out, r, generator=g, dtype=torch.float64), source=source)


def target(units, w):
    """What LEGO approximates: the weighted average Σ wᵢ ΔWᵢ / Σ |wᵢ| (LEGO's weights are relative)."""
    tot = sum(abs(x) for x in w)
    return RankUnits.concat([u.scaled(x / tot) for u, x in zip(units, w)]).delta()


def planted_units(groups=4, per=6, d_out=10, d_in=8, noise=0.03, seed=0):
    """Units around `groups` directions, each with a random scale split c·b, a/c (c in [0.05, 20])
    and a random sign flip (−b)(−a)ᵀ; group g is tagged as input g (source) so the pool remembers it.

    Each a-direction has one clearly dominant entry: the canonical sign rule (largest |a| entry
    positive) is only stable when the top two |entries| differ by more than the noise (see README)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(groups):
        b0, a0 = torch.randn(d_out, generator=g), torch.randn(d_in, generator=g)
        a0[gi % d_in] = 3.0 * a0.abs().max() * (1 if gi % 2 else -1)
        c = torch.exp(torch.empty(per).uniform_(math.log(0.05), math.log(20), generator=g))
        s = torch.where(torch.rand(per, generator=g) < 0.5, -1.0, 1.0)
        B = (b0[:, None] + noise * torch.randn(d_out, per, generator=g)) * (c * s)[None, :]
        A = (a0[None, :] + noise * torch.randn(per, d_in, generator=g)) * (s / c)[:, None]
        out.append(RankUnits.from_factors(A.double(), B.double(), source=gi))
    return out


# ---------------------------------------------------------------- paper properties
def test_invariant_to_unit_permutation_and_input_order():
    us = [rand_units(4, seed=1, source=0), rand_units(6, seed=2, source=1), rand_units(3, seed=3, source=2)]
    w = [1.0, 0.5, 2.0]
    p = P(k=5)
    ref = lego.merge_module(us, w, p, CTX).delta()
    perm = [us[0].permuted(torch.tensor([2, 0, 3, 1])), us[1].permuted(torch.tensor([5, 4, 3, 2, 1, 0])), us[2]]
    assert rel(lego.merge_module(perm, w, p, CTX).delta(), ref) < 1e-10
    assert rel(lego.merge_module([us[2], us[0], us[1]], [2.0, 1.0, 0.5], p, CTX).delta(), ref) < 1e-10


@pytest.mark.parametrize("reweight", ["paper", "lsq", "none"])
def test_k_at_least_the_pool_keeps_every_unit(reweight):
    """k ≥ pooled rank: every unit is its own cluster.  lsq then reproduces the weighted average exactly;
    none keeps the pooled units (n × the average: the pool holds each input at relative weight ω = n·w/Σ|w|);
    paper is the same with ρ = 1 (a singleton is its own centroid) and the output factor √(r/k), r = the
    inputs' mean rank 6, k = the 12 clusters formed (the published code has no k ≥ pool shortcut either)."""
    us = [rand_units(4, seed=1), rand_units(8, seed=2, source=1)]
    w = [0.7, -1.3]
    want = {"lsq": 1.0, "none": 2.0, "paper": 2.0 * math.sqrt(6 / 12)}[reweight]
    for p in (P(k=12, reweight=reweight), P(k=40, reweight=reweight), P(k_ratio=1.0, reweight=reweight),
              P(k=12, reweight=reweight, features="canonical")):
        out = lego.merge_module(us, w, p, CTX)
        assert out.rank == 12
        assert rel(out.delta(), want * target(us, w)) < 1e-12


@pytest.mark.parametrize("reweight", ["paper", "none"])
def test_k_equal_to_rank_on_identical_inputs_reproduces_the_input(reweight):
    u = rand_units(3, seed=4)
    one = u.select(torch.tensor([0]))
    out1 = lego.merge_module([one, one], [1.0, 1.0], P(k=1, reweight=reweight), CTX)
    assert rel(out1.delta(), one.delta()) < 1e-12
    out3 = lego.merge_module([u, u, u], [1.0, 1.0, 1.0], P(k=3, reweight=reweight), CTX)
    assert out3.rank == 3 and rel(out3.delta(), u.delta()) < 1e-12


# ---------------------------------------------------------------- planted clusters
def _pool_ari(units, features, signs="invariant"):
    from mergekit_lora.algorithms.lego.pool import build_pools
    from mergekit_lora.kmeans import kmeans_gram

    pool = build_pools([units], [[1.0] * len(units)], features=features, signs=signs,
                       generators=[CTX.generator("o")], device=torch.device("cpu"))
    res = kmeans_gram(pool.K("concat"), len(units), generators=[CTX.generator("k")], n_init=3,
                      sign_invariant=signs == "invariant")
    return adjusted_rand_score(pool.source[0], res.labels[0])


def _unflipped(u, gi):
    """Planted group gi with its random sign flips undone (group gi's dominant a-entry is gi: made positive)."""
    s = u.A[:, gi].sign()
    return RankUnits.from_factors(u.A * s[:, None], u.B * s[None, :], source=gi)


def test_planted_recovery_needs_scale_free_features():
    for seed in range(3):
        units = planted_units(seed=seed)
        assert _pool_ari(units, "canonical") == 1.0
        assert _pool_ari(units, "canonical", signs="rule") == 1.0  # one clearly dominant |a| entry
        assert _pool_ari(units, "paper") == 1.0  # [a/‖a‖; b/‖b‖] is scale-free too; signs left to k-means
        assert _pool_ari(units, "raw", signs="none") < 0.5  # raw [a;b] clusters scales and signs, not directions
        # the published features as they are (no sign handling): the random sign flips (−b)(−a)ᵀ split groups
        assert _pool_ari(units, "paper", signs="none") < 0.9


def test_planted_recovery_with_the_published_features():
    """No sign flips (units as trained from one initialisation): the paper's features [a/‖a‖; b/‖b‖] with
    plain Euclidean k-means recover every group whatever the scale split c·b, a/c."""
    for seed in range(3):
        units = [_unflipped(u, i) for i, u in enumerate(planted_units(seed=seed))]
        assert _pool_ari(units, "paper", signs="none") == 1.0
        assert _pool_ari(units, "raw", signs="none") < 0.5


def test_sign_invariant_clustering_survives_near_tied_sign_rule():
    """Units whose a-direction has two entries of (nearly) equal magnitude and opposite sign: noise decides
    which is the largest, so the sign rule flips half of each group to the antipode and k-means on
    rule-signed vectors splits groups; sign-invariant k-means (v ~ −v) recovers every group."""
    g = torch.Generator().manual_seed(3)
    units = []
    for gi in range(3):
        b0, a0 = torch.randn(10, generator=g), 0.3 * torch.randn(8, generator=g)
        a0[2 * gi], a0[2 * gi + 1] = 2.0, -2.0  # the top two |entries| tie
        per = 8
        s = torch.where(torch.rand(per, generator=g) < 0.5, -1.0, 1.0)
        B = (b0[:, None] + 0.02 * torch.randn(10, per, generator=g)) * s[None, :]
        A = (a0[None, :] + 0.02 * torch.randn(per, 8, generator=g)) * s[:, None]
        units.append(RankUnits.from_factors(A.double(), B.double(), source=gi))
    assert _pool_ari(units, "canonical") == 1.0
    assert _pool_ari(units, "canonical", signs="rule") < 0.8
    out = lego.merge_module(units, [1.0] * 3, P(k=3, reweight="lsq", features="canonical"), CTX)
    assert rel(out.delta(), target(units, [1.0] * 3)) < 0.05  # one sign-aligned centroid per group


def test_planted_merge_report_and_backends_agree(tmp_path):
    from mergekit_lora.adapter import Adapter, AdapterMeta

    units = planted_units(seed=7)
    ads = [Adapter.from_units({"layers.0.q_proj": u}, AdapterMeta("memory"), label=f"in{i}")
           for i, u in enumerate(units)]
    deltas = {}
    for backend in ("torch", "sklearn", "faiss"):
        r = merge(ads, "lego", tmp_path / backend, scale="none",
                  params={"k": 4, "backend": backend, "report": True, "reweight": "lsq",
                                                   "features": "canonical"},
                  device="cpu")  # the CPU backends compared; CUDA has its own tests
        rep = json.loads((tmp_path / backend / "lego_report.json").read_text())["modules"]["layers.0.q_proj"]
        assert sorted(rep["sizes"]) == [6, 6, 6, 6]
        for row in rep["input_by_cluster"].values():  # each planted group fills exactly one cluster
            assert sorted(row) == [0, 0, 0, 6]
        assert min(rep["cos_to_centroid_min"]) > 0.95
        deltas[backend] = load_adapter(tmp_path / backend).units("layers.0.q_proj").delta()
        assert r.fidelity["overall"]["rel_error"] < 0.1
    assert rel(deltas["sklearn"], deltas["torch"]) < 1e-6 and rel(deltas["faiss"], deltas["torch"]) < 1e-6
    assert (tmp_path / "torch" / "lego_report.md").read_text().startswith("# LoRA-LEGO cluster report")


# ---------------------------------------------------------------- reweighting
def test_lsq_is_the_dense_least_squares_optimum_and_beats_none():
    for seed in range(3):
        us = [rand_units(5, seed=seed), rand_units(7, seed=seed + 10, source=1)]
        w = [1.0, 0.6]
        T = target(us, w)
        raw = lego.merge_module(us, w, P(k=4, reweight="none"), CTX)
        lsq = lego.merge_module(us, w, P(k=4, reweight="lsq"), CTX)
        paper = lego.merge_module(us, w, P(k=4, reweight="paper"), CTX)
        # dense solve over the same centroid units: columns vec(b_j a_jᵀ)
        cols = torch.stack([torch.outer(raw.B[:, j], raw.A[j]).flatten() for j in range(raw.rank)], 1)
        s = torch.linalg.lstsq(cols, T.flatten()[:, None]).solution
        dense_err = float((cols @ s).flatten().sub(T.flatten()).norm())
        e_lsq = float((lsq.delta() - T).norm())
        assert e_lsq == pytest.approx(dense_err, rel=1e-9)
        assert e_lsq <= float((raw.delta() - T).norm()) + 1e-12
        assert e_lsq <= float((paper.delta() - T).norm()) + 1e-12


def test_paper_parameter_reweighting_by_hand():
    """Two rank-1 inputs, k = 1 (r = k: output factor 1).  u1 = [a1; b1] = [1, 2; 3, −1] (‖u1‖∞ = 3),
    u2 = [2, 0; 1, 1] (‖u2‖∞ = 2); centroid [1.5, 1; 2, 0], ‖·‖∞ = 2, ρ = (3 + 2)/2 / 2 = 1.25, so
    ā = [1.875, 1.25], b̄ = [2.5, 0].  Equal weights of any size are the unweighted pool; weights 3:1 are
    relative weights ω = (1.5, 0.5) on the b-halves: u1 = [1, 2; 4.5, −1.5], u2 = [2, 0; 0.5, 0.5],
    centroid [1.5, 1; 2.5, −0.5], ρ = (4.5 + 2)/2 / 2.5 = 1.3."""
    u1 = RankUnits.from_factors(torch.tensor([[1.0, 2.0]], dtype=torch.float64),
                                torch.tensor([[3.0], [-1.0]], dtype=torch.float64))
    u2 = RankUnits.from_factors(torch.tensor([[2.0, 0.0]], dtype=torch.float64),
                                torch.tensor([[1.0], [1.0]], dtype=torch.float64), source=1)
    want = torch.outer(torch.tensor([2.5, 0.0]), torch.tensor([1.875, 1.25])).double()
    for w in ([1.0, 1.0], [0.5, 0.5], [7.0, 7.0]):
        out = lego.merge_module([u1, u2], w, P(k=1, reweight="paper", features="paper"), CTX)
        assert torch.allclose(out.delta(), want, rtol=0, atol=1e-12)
    want31 = 1.3**2 * torch.outer(torch.tensor([2.5, -0.5]), torch.tensor([1.5, 1.0])).double()
    out = lego.merge_module([u1, u2], [3.0, 1.0], P(k=1, reweight="paper", features="paper"), CTX)
    assert torch.allclose(out.delta(), want31, rtol=0, atol=1e-12)
    # none: the raw centroid; lsq: the best multiple of it for the weighted average (u1 + u2)/2
    none = lego.merge_module([u1, u2], [1.0, 1.0], P(k=1, reweight="none", features="paper"), CTX).delta()
    c = torch.outer(torch.tensor([2.0, 0.0]), torch.tensor([1.5, 1.0])).double()
    assert torch.allclose(none, c, rtol=0, atol=1e-12)
    T = (u1.delta() + u2.delta()) / 2
    lsq = lego.merge_module([u1, u2], [1.0, 1.0], P(k=1, reweight="lsq", features="paper"), CTX).delta()
    assert torch.allclose(lsq, (c * T).sum() / (c * c).sum() * c, rtol=0, atol=1e-12)


def test_paper_merge_equals_a_dense_reimplementation_with_output_factor():
    """Three planted groups (one per input, rank 4 each: r = 4), k = 3: the whole published merge, written
    densely from its formulas on the known groups: Σ_j ρ_j² b̄_j ā_jᵀ × √(r/k) with ρ_j by max-abs norms."""
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        units = []
        for gi in range(3):  # a group: one random direction plus 80 % noise per unit
            a0, b0 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
            units.append(RankUnits.from_factors(a0 + 0.8 * torch.randn(4, 8, generator=g, dtype=torch.float64),
                                                b0[:, None] + 0.8 * torch.randn(10, 4, generator=g, dtype=torch.float64),
                                                source=gi))
        want, raw = torch.zeros(10, 8, dtype=torch.float64), torch.zeros(10, 8, dtype=torch.float64)
        rhos = []
        for u in units:
            V = torch.cat([u.A, u.B.T], 1)  # the members' raw [a; b]
            mu = V.mean(0)
            raw += torch.outer(mu[8:], mu[:8])
            rho = V.abs().amax(1).mean() / mu.abs().max()
            rhos.append(float(rho))
            want += rho**2 * torch.outer(mu[8:], mu[:8])
        want *= math.sqrt(4 / 3)
        # ρ ≥ 1 always (‖mean‖∞ ≤ mean ‖·‖∞), = 1 when every member peaks at the same entry; here some differ
        assert min(rhos) >= 1 - 1e-12 and max(rhos) > 1.05
        assert rel(lego.merge_module(units, [1.0] * 3, P(k=3, features="paper"), CTX).delta(), want) < 1e-12
        assert rel(lego.merge_module(units, [1.0] * 3, P(k=3, reweight="none", features="paper"), CTX).delta(),
                   raw) < 1e-12


def test_paper_features_average_raw_units_canonical_average_balanced_ones():
    """Two copies of one unit at different scale splits (b, a) and (4b, a/4): the same ΔW.  Canonical form
    makes them identical, so the centroid is the unit itself; the published form averages the raw vectors:
    centroid (5/2 b)(5/8 a)ᵀ = 25/16 b aᵀ.  Both cluster them together (the paper's features are scale-free)."""
    u = rand_units(1, seed=3)
    v = RankUnits.from_factors(u.A / 4, u.B * 4, source=1)
    can = lego.merge_module([u, v], [1.0, 1.0], P(k=1, reweight="none", features="canonical"), CTX)
    pap = lego.merge_module([u, v], [1.0, 1.0], P(k=1, reweight="none", features="paper"), CTX)
    assert rel(can.delta(), u.delta()) < 1e-12
    assert rel(pap.delta(), 25 / 16 * u.delta()) < 1e-12
    assert _pool_ari([u, v], "paper", signs="none") == 1.0 and _pool_ari([u, v], "canonical") == 1.0


def test_balance_inputs_counts_each_input_once_per_cluster():
    """k = 1 over input 0 (rank 3) and input 1 (rank 1): the plain mean weighs input 0 three times as much;
    balance_inputs averages input 0's units first, then the two inputs.  Member max-abs norms are averaged
    with the same weights (paper reweighting)."""
    u0, u1 = rand_units(3, seed=5), rand_units(1, seed=6, source=1)
    V0, V1 = torch.cat([u0.A, u0.B.T], 1), torch.cat([u1.A, u1.B.T], 1)
    plain, bal = torch.cat([V0, V1]).mean(0), (V0.mean(0) + V1[0]) / 2
    for mu, flag in ((plain, False), (bal, True)):
        out = lego.merge_module([u0, u1], [1.0, 1.0], P(k=1, reweight="none", balance_inputs=flag, features="paper"),
                                CTX)
        assert rel(out.delta(), torch.outer(mu[8:], mu[:8])) < 1e-12
    linf = (V0.abs().amax(1).mean() + V1.abs().amax()) / 2
    out = lego.merge_module([u0, u1], [1.0, 1.0], P(k=1, balance_inputs=True, features="paper"), CTX)
    want = (linf / bal.abs().max()) ** 2 * math.sqrt(2 / 1) * torch.outer(bal[8:], bal[:8])  # r = mean rank 2
    assert rel(out.delta(), want) < 1e-12


def test_merged_units_keep_the_input_of_a_single_input_cluster():
    """A cluster whose members all come from one input keeps it as the merged unit's source; others get -1."""
    units = planted_units(seed=0)  # group g is input g
    assert sorted(lego.merge_module(units, [1.0] * 4, P(k=4), CTX).source.tolist()) == [0, 1, 2, 3]
    assert lego.merge_module(units, [1.0] * 4, P(k=1), CTX).source.tolist() == [-1]
    merged = lego.merge_module(units[:2], [1.0] * 2, P(k=2), CTX)  # sources 0, 1 ...
    again = merged.with_factors(merged.A, merged.B, torch.tensor([-1, -1]))  # ... or -1: a unit of no one input
    assert sorted(lego.merge_module([again, units[2]], [1.0, 1.0], P(k=8), CTX).source.tolist()) == [-1] * 2 + [2] * 6


# ---------------------------------------------------------------- batching, edge cases
def test_batch_equals_module_by_module_and_respects_module_seeds():
    mods = [[rand_units(4, seed=s), rand_units(4, seed=s + 50, source=1)] for s in range(3)]
    ctxs = [ModuleContext(f"layers.{i}.q_proj", 0, torch.device("cpu")) for i in range(3)]
    p = P(k=3, n_init=2)
    batched = lego.merge_batch(mods, [[1.0, 0.5]] * 3, p, ctxs)
    for u, c, b in zip(mods, ctxs, batched):
        assert rel(b.delta(), lego.merge_module(u, [1.0, 0.5], p, c).delta()) < 1e-12


def test_reused_pool_buffer_and_pickled_algorithm_give_the_same_merge():
    """The pool buffer is kept between batches (and not pickled: a plan sent to a worker starts empty)."""
    import pickle

    algo = get_algorithm("lego")
    big = [rand_units(6, d_out=30, d_in=20, seed=s, source=i) for i, s in enumerate((1, 2))]
    small = [rand_units(4, seed=s, source=i) for i, s in enumerate((3, 4))]
    p = P(k=3)
    first = algo.merge_module(small, [1.0, 1.0], p, CTX).units
    algo.merge_module(big, [1.0, 1.0], p, CTX)  # a larger pool in the same buffer
    again = algo.merge_module(small, [1.0, 1.0], p, CTX).units
    copy = pickle.loads(pickle.dumps(algo)).merge_module(small, [1.0, 1.0], p, CTX).units
    for u in (again, copy):
        assert torch.equal(u.A, first.A) and torch.equal(u.B, first.B)


def test_zero_and_duplicate_units_give_finite_rank_k_output():
    u = rand_units(2, seed=9)
    zero = RankUnits.from_factors(torch.zeros(3, 8, dtype=torch.float64), torch.zeros(10, 3, dtype=torch.float64))
    for reweight in ("paper", "lsq", "none"):
        out = lego.merge_module([u, u, zero], [1.0, 1.0, 1.0], P(k=4, reweight=reweight), CTX)
        assert out.rank == 4 and torch.isfinite(out.A).all() and torch.isfinite(out.B).all()
    lsq = lego.merge_module([u, u, zero], [1.0, 1.0, 1.0], P(k=4, reweight="lsq"), CTX)
    assert rel(lsq.delta(), 2 / 3 * u.delta()) < 1e-10  # 3 distinct units (2 + zero) fit in k=4 exactly
    allzero = lego.merge_module([zero, zero], [1.0, 1.0], P(k=2), CTX)
    assert float(allzero.delta().abs().max()) == 0.0


def test_params_are_validated():
    from mergekit_lora.errors import LoraMergeError

    for bad in ({"k": 2, "k_ratio": 0.5}, {"k": 0}, {"k": 2, "space": "c"}, {"k": 2, "backend": "x"},
                {"k": 2, "features": "x"}, {"k": 2, "signs": "x"}):
        with pytest.raises(LoraMergeError):
            P(**bad)
    assert P(k_ratio=0.25).k_for(12, 4) == 3 and P(k_ratio=0.3).k_for(12, 4) == 4
    assert P().k_for(12, 4) == 4 and P(k=6).k_for(12, 4) == 6  # default k = r (the inputs' largest rank)
    # default: canonical features (the best measured variant, README), sign-invariant k-means
    assert P(k=2).sign_mode == "invariant" and P(k=2, features="paper").sign_mode == "none"
    assert P(k=2, signs="rule").sign_mode == "rule"


# ---------------------------------------------------------------- real adapters: PEFT, CLI


def test_pool_grams_on_transposed_views_equal_those_on_transposed_copies():
    """build_pools multiplies transposed views (no copy of the pool): the Grams' bits are those of the
    copies' product, at 1 and 2 threads (the row-blocked GEMMs of threads.matmul)."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(3, 128, 2900, generator=g)  # [M, N, d_in]: above PARALLEL_MIN_FLOPS (the blocked product)
    B = torch.randn(3, 2900, 128, generator=g)  # [M, d_out, N]
    for threads in (1, 2):
        with thread_policy(threads):
            budget = current()  # what execute hands build_pools in the module context
            assert budget.budget == threads
            assert torch.equal(budget.matmul(A, A.transpose(1, 2)), budget.matmul(A, A.transpose(1, 2).contiguous()))
            assert torch.equal(budget.matmul(B.transpose(1, 2), B), budget.matmul(B.transpose(1, 2).contiguous(), B))


def test_small_products_on_views_have_the_bits_of_contiguous_operands():
    """Below the blocked threshold a product is one plain GEMM: on contiguous operands, so a transposed view
    gives the bits of a copy (MKL's small-GEMM kernel for a transposed operand rounds differently; it changed
    a kohya LEGO output by 1 ulp once)."""
    from mergekit_lora.threads import NO_BUDGET

    g = torch.Generator().manual_seed(11)
    for m, n, d in [(1, 8, 40), (2, 12, 320), (3, 16, 1280), (4, 24, 2880)]:
        A = torch.randn(m, n, d, generator=g)
        want = torch.bmm(A, A.transpose(1, 2).contiguous())
        for threads in (None, 1, 2):
            if threads is None:
                got = NO_BUDGET.matmul(A, A.transpose(1, 2))
            else:
                with thread_policy(threads):
                    got = current().matmul(A, A.transpose(1, 2))
            assert torch.equal(got, want), (m, n, d, threads)


@pytest.mark.parametrize("special", ["none", "neg", "zero", "nan"])
def test_centroid_max_abs_norms_equal_abs_amax(special):
    """centroids' ‖[ā_j ; b̄_j]‖_∞ (two reductions, no |x| temporary) are exactly max |x| of the factors it returns."""
    from mergekit_lora.algorithms.lego.pool import build_pools
    from mergekit_lora.algorithms.lego.reweight import centroids, cluster_stats

    units = [rand_units(4, d_out=24, d_in=8, seed=s, source=s) for s in range(3)]
    pool = build_pools([units, units], [[1.0] * 3] * 2, features="canonical", signs="invariant",
                       generators=[CTX.generator("o"), CTX.generator("p")], device=torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    stats = []
    for m in range(2):
        labels = torch.randint(0, 5, (12,), generator=g)
        stats.append(cluster_stats(pool.KA[m], pool.KB[m], labels, torch.ones(12, dtype=torch.float64), 5,
                                   pool.linf[m], pool.target_scale[m]))
    if special == "neg":  # a centroid whose largest entries are all negative
        for st in stats:
            st.W.neg_()
    elif special == "zero":  # an empty cluster: a zero unit (max |x| = +0)
        stats[1].W[:, 2] = 0
    elif special == "nan":
        stats[0].W[0, 1] = float("nan")
    A_c, B_c, linf = centroids(pool, stats)
    want = torch.maximum(A_c.abs().amax(2), B_c.abs().amax(1)).double()
    assert torch.equal(linf.isnan(), want.isnan())
    assert torch.equal(linf.nan_to_num(), want.nan_to_num())
    assert not torch.signbit(linf.nan_to_num()).any()
