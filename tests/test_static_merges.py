"""Static merges (svd, ties, dare_*, magnitude_prune, linear, cat) against PEFT's own code as the oracle.

Inputs are real PEFT adapters on a tiny Llama (ranks 4, 6 and 2, one of them rsLoRA).  PEFT's dense
intermediates are computed by ``peft.utils.merge_utils`` on PEFT's own ``get_delta_weight``; PEFT's
final results come from ``add_weighted_adapter``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_peft_adapter, outputs, peft_model, rel, tiny_llama
from peft.utils import merge_utils

from mergekit_lora import load_adapter
from mergekit_lora.pipeline import merge
from mergekit_lora.registry import ModuleContext, get_algorithm, parse_params

TARGETS = ["q_proj", "v_proj", "down_proj"]
SPECS = [dict(r=4, lora_alpha=8, seed=11), dict(r=6, lora_alpha=4, seed=12, use_rslora=True),
         dict(r=2, lora_alpha=2, seed=13)]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("static")
    return [make_peft_adapter(root / f"in{i}", target_modules=TARGETS, **s) for i, s in enumerate(SPECS)]


@pytest.fixture(scope="module")
def same_rank_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("same_rank")
    return [make_peft_adapter(root / f"s{i}", r=4, lora_alpha=8, seed=21 + i) for i in range(2)]


def peft_with(paths):
    """A PeftModel holding every input as adapter a0, a1, …"""
    pm = peft_model(paths[0])
    pm.load_adapter(str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"a{i}")
    return pm, [f"a{i}" for i in range(len(paths))]


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    return {n[len(PREFIX):]: m for n, m in pm.named_modules() if isinstance(m, LoraLayer) and "a0" in m.lora_A}


def peft_combined(paths, weights, combination, **kw):
    """ΔW of PEFT's add_weighted_adapter result per module (B @ A of the new adapter: its scale is r/r = 1)."""
    pm, names = peft_with(paths)
    pm.add_weighted_adapter(names, weights, "m", combination_type=combination, **kw)
    return {n: (m.lora_B["m"].weight @ m.lora_A["m"].weight).detach() for n, m in lora_layers(pm).items()}


def peft_dense(paths, weights, fn, seed_for=None):
    """PEFT's dense intermediate: merge_utils.<fn>(get_delta_weight(a_i), weights) per module."""
    pm, names = peft_with(paths)
    out = {}
    for n, m in lora_layers(pm).items():
        deltas = [m.get_delta_weight(a).detach() for a in names]
        if seed_for is not None:
            torch.manual_seed(seed_for(n))
        out[n] = fn(deltas, torch.tensor(weights))
    return out


def ours(paths, method, weights, seed=0, **params):
    """(pre-truncation dense ΔW or None, merged ΔW) per module, straight from the algorithm."""
    algo = get_algorithm(method)
    p = parse_params(algo, params)
    adapters = [load_adapter(x) for x in paths]
    res = {}
    for n in adapters[0].module_names():
        units = [a.units(n, source=i) for i, a in enumerate(adapters)]
        ctx = ModuleContext(n, seed, torch.device("cpu"))
        dense = algo.dense(units, weights, p, ctx) if hasattr(algo, "dense") else None
        res[n] = (dense, algo.merge_module(units, weights, p, ctx).units.delta())
    return res


def tail(d: torch.Tensor, k: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return float(s[k:].pow(2).sum().sqrt())


@pytest.mark.parametrize("rank", [None, 3])
def test_svd_matches_peft_svd_and_eckart_young(paths, rank):
    w = [0.7, -0.4, 1.2]
    target = peft_dense(paths, w, merge_utils.task_arithmetic)
    theirs = peft_combined(paths, w, "svd", svd_rank=rank)
    got = ours(paths, "svd", w, rank=rank)
    for n, (_, dw) in got.items():
        k = rank or 6
        assert rel(dw, theirs[n]) < 1e-5, n
        err = float((dw.double() - target[n].double()).norm())
        assert abs(err - tail(target[n], k)) <= 1e-5 * float(target[n].double().norm()), n


DENSE_CASES = {
    # name: (our method, our params, PEFT merge_utils fn, PEFT combination, weights)
    "ties-total": ("ties", dict(density=0.5), lambda d, w: merge_utils.ties(d, w, 0.5, "total"), "ties_svd",
                   [0.8, 0.8, 0.8]),
    "ties-frequency": ("ties", dict(density=0.4, majority_sign="frequency"),
                       lambda d, w: merge_utils.ties(d, w, 0.4, "frequency"), "ties_svd", [0.5, 1.0, 1.5]),
    # PEFT's sign rule (sign_from=unweighted): its ties_svd result for unequal and negative weights too
    "ties-peft-sign": ("ties", dict(density=0.5, sign_from="unweighted"),
                       lambda d, w: merge_utils.ties(d, w, 0.5, "total"), "ties_svd", [0.7, -0.4, 1.2]),
    "magnitude_prune": ("magnitude_prune", dict(density=0.3), lambda d, w: merge_utils.magnitude_prune(d, w, 0.3),
                        "magnitude_prune_svd", [0.7, -0.4, 1.2]),
    "dare_linear-d1": ("dare_linear", dict(density=1.0), lambda d, w: merge_utils.dare_linear(d, w, 1.0),
                       "dare_linear_svd", [0.7, -0.4, 1.2]),
    "dare_ties-d1": ("dare_ties", dict(density=1.0), lambda d, w: merge_utils.dare_ties(d, w, 1.0, "total"),
                     "dare_ties_svd", [0.6, 0.6, 0.6]),
}


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_methods_match_peft_svd_variants(paths, case):
    method, params, fn, combination, w = DENSE_CASES[case]
    want_dense = peft_dense(paths, w, fn)
    theirs = peft_combined(paths, w, combination, density=params["density"],
                           majority_sign_method=params.get("majority_sign", "total"))
    got = ours(paths, method, w, exact_svd=True, **params)
    for n, (dense, dw) in got.items():
        assert rel(dense, want_dense[n]) < 1e-6, (n, rel(dense, want_dense[n]))
        assert rel(dw, theirs[n]) < 1e-4, (n, rel(dw, theirs[n]))
        err = float((dw.double() - dense.double()).norm())
        assert abs(err - tail(dense, 6)) <= 1e-5 * float(dense.double().norm()), n


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_seeded_masks_equal_peft_on_the_same_random_stream(paths, method):
    """Our masks come from a generator seeded per module; seeding PEFT's global RNG the same way reproduces them."""
    w, density, seed = [0.9, 0.9, 0.9], 0.5, 7
    fn = ((lambda d, x: merge_utils.dare_linear(d, x, density)) if method == "dare_linear"
          else (lambda d, x: merge_utils.dare_ties(d, x, density, "total")))
    want = peft_dense(paths, w, fn,
                      seed_for=lambda n: ModuleContext(n, seed, torch.device("cpu")).generator("dare").initial_seed())
    got = ours(paths, method, w, seed=seed, density=density, exact_svd=True)
    for n, (dense, dw) in got.items():
        assert rel(dense, want[n]) < 1e-6, n
        assert (dense == 0).float().mean() > 0.05  # entries really were dropped
        err = float((dw.double() - dense.double()).norm())
        assert abs(err - tail(dense, 6)) <= 1e-5 * float(dense.double().norm()), n
    other = ours(paths, method, w, seed=seed + 1, density=density, exact_svd=True)
    n = next(iter(got))
    assert rel(other[n][0], got[n][0]) > 0.1  # another seed, other masks


def test_randomised_refactor_is_close_to_the_exact_optimum(paths):
    w = [1.0, 1.0, 1.0]
    got = ours(paths, "ties", w, density=0.5)
    for n, (dense, dw) in got.items():
        err = float((dw.double() - dense.double()).norm())
        assert err <= 1.02 * tail(dense, 6) + 1e-6 * float(dense.double().norm()), n


def test_linear_is_exact_where_peft_linear_has_cross_terms(same_rank_paths):
    w = [1.0, -1.0]
    target = peft_dense(same_rank_paths, w, merge_utils.task_arithmetic)
    peft_linear = peft_combined(same_rank_paths, w, "linear")
    peft_cat = peft_combined(same_rank_paths, w, "cat")
    lin = ours(same_rank_paths, "linear", w)
    cat = ours(same_rank_paths, "cat", w)
    for n, t in target.items():
        assert rel(lin[n][1], t) < 1e-6, n
        assert rel(cat[n][1], peft_cat[n]) < 1e-6, n
        assert rel(peft_linear[n], t) > 0.3, n  # B_i A_j cross terms: PEFT's linear is not Σ w_i ΔW_i


def test_linear_is_invariant_to_input_order(paths):
    w = [0.7, -0.4, 1.2]
    a = ours(paths, "linear", w)
    b = ours([paths[2], paths[0], paths[1]], "linear", [w[2], w[0], w[1]])
    for n in a:
        assert rel(b[n][1], a[n][1]) < 1e-6


ALL = {"linear": {}, "cat": {}, "svd": {}, "ties": {"density": 1.0}, "dare_linear": {"density": 1.0},
       "dare_ties": {"density": 1.0}, "magnitude_prune": {"density": 1.0}}


@pytest.mark.parametrize("method", list(ALL))
def test_one_rslora_input_with_weight_one_is_the_identity(paths, tmp_path, method):
    """The output loads in PeftModel and gives the input's logits (PEFT gets rsLoRA identity merges wrong, #3761)."""
    src = paths[1]  # rsLoRA
    merge([src], method, tmp_path / "out", weights=[1.0], params=ALL[method], device="cpu", scale="none")
    want = outputs(peft_model(src), "llama")
    got = outputs(peft_model(tmp_path / "out"), "llama")
    assert rel(got, want) < 1e-5, rel(got, want)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5, "lambda": 0.8}), ("svd", {"rank": 3})])
def test_logits_equal_base_plus_merged_delta(paths, tmp_path, method, params):
    res = merge(paths, method, tmp_path / "out", weights=[0.6, 0.5, 0.9], params=params, device="cpu", scale="none")
    assert res.fidelity["overall"]["rel_error"] > 0  # a lossy merge, measured
    merged = load_adapter(tmp_path / "out")
    base = tiny_llama()
    sd = base.state_dict()
    with torch.no_grad():
        for n in merged.module_names():
            sd[n + ".weight"] += merged.units(n).delta_weight()
    base.load_state_dict(sd)
    got = outputs(peft_model(tmp_path / "out"), "llama")
    assert rel(got, outputs(base, "llama")) < 1e-5
    if method == "ties":
        assert "refactor rel. error" in " ".join(res.report)
        assert "## Algorithm report" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("method,params", [("dare_ties", {"density": 0.5}), ("ties", {"density": 0.3}),
                                           ("svd", {"rank": 3})])
def test_same_seed_gives_identical_bytes(paths, tmp_path, method, params):
    def run(name, seed):
        merge(paths, method, tmp_path / name, weights=[1.0, 0.5, 0.7], params=params, seed=seed, device="cpu")
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    first = run("a", 3)
    assert run("b", 3) == first
    if method == "dare_ties":
        assert run("c", 4) != first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,params", [("svd", {}), ("ties", {"density": 0.5, "exact_svd": True}),
                                           ("dare_linear", {"density": 0.5, "exact_svd": True}), ("linear", {})])
def test_cuda_merge_matches_cpu(paths, tmp_path, method, params):
    w = [0.7, -0.4, 1.2]
    merge(paths, method, tmp_path / "cpu", weights=w, params=params, device="cpu", seed=1)
    merge(paths, method, tmp_path / "gpu", weights=w, params=params, device="cuda", seed=1)
    a, b = load_adapter(tmp_path / "cpu"), load_adapter(tmp_path / "gpu")
    for n in a.module_names():
        assert rel(b.units(n).delta(), a.units(n).delta()) < 1e-4, n
