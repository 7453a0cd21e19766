"""``sign_from=unweighted``: PEFT's TIES sign rule (elect on the unweighted trimmed tensors, then the disjoint
mean of the weighted entries agreeing with it) in the chunk-fused pass, full and core space.

Oracle: ``peft.utils.merge_utils.ties`` / ``dare_ties`` on the same dense ΔW_i (full space) or on the same
unweighted core matrices (core space), with unequal, negative and zero weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import sota_oracles as O
import torch
from peft.utils import merge_utils

from mergekit_lora.registry import ModuleContext, get_algorithm, parse_params
from mergekit_lora.units import RankUnits

WEIGHTS = {"unequal-negative": [0.7, -0.4, 1.2], "with-zero": [0.9, 0.0, -1.3]}


def rand_units(m, n, ranks, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [RankUnits.from_factors(torch.randn(r, n, generator=g, dtype=dtype),
                                   torch.randn(m, r, generator=g, dtype=dtype) * (0.5 + i), source=i)
            for i, r in enumerate(ranks)]


def ctx(seed=3):
    return ModuleContext("layers.0.q_proj", seed, torch.device("cpu"))


def dense(method, units, w, **params):
    algo = get_algorithm(method)
    return algo.dense(units, w, parse_params(algo, {"exact_svd": True, **params}), ctx())


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [(60, 90), (300, 1000)])  # exact thresholds; sampled ones and several chunks
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("wname", list(WEIGHTS))
def test_ties_unweighted_sign_equals_peft_ties(shape, sign, wname):
    w = WEIGHTS[wname]
    units = rand_units(*shape, (4, 6, 2), seed=sum(shape))
    ref = merge_utils.ties([u.delta() for u in units], torch.tensor(w), 0.4, sign)
    got = dense("ties", units, w, density=0.4, majority_sign=sign, sign_from="unweighted")
    assert rel(got, ref) < 1e-6, rel(got, ref)
    assert rel(dense("ties", units, w, density=0.4, majority_sign=sign), ref) > 1e-3  # the default rule differs


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("wname", list(WEIGHTS))
def test_dare_ties_unweighted_sign_equals_peft_with_the_same_masks(wname):
    w, density = WEIGHTS[wname], 0.5
    units = rand_units(120, 200, (4, 6, 2), seed=9)
    torch.manual_seed(ctx().generator("dare").initial_seed())  # PEFT's global stream = our per-module masks
    ref = merge_utils.dare_ties([u.delta() for u in units], torch.tensor(w), density, "total")
    got = dense("dare_ties", units, w, density=density, sign_from="unweighted")
    assert rel(got, ref) < 1e-6, rel(got, ref)
    assert rel(dense("dare_ties", units, w, density=density), ref) > 1e-3


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_lambda_scales_the_peft_rule(method):
    units, w = rand_units(50, 70, (3, 3, 3), seed=2), [0.7, -0.4, 1.2]
    base = dense(method, units, w, density=0.5, sign_from="unweighted")
    scaled = dense(method, units, w, density=0.5, sign_from="unweighted", **{"lambda": 0.6})
    torch.testing.assert_close(scaled, 0.6 * base, rtol=1e-6, atol=0)


def test_core_space_unweighted_sign_equals_peft_ties_on_the_unweighted_cores():
    units, w = rand_units(40, 32, (2, 3, 4), seed=4, dtype=torch.float64), [0.8, 1.3, -0.6]
    algo = get_algorithm("ties")
    UB, VhA = O.core_bases(units, w)
    cores = [torch.from_numpy(UB.T @ u.delta().double().numpy() @ VhA.T) for u in units]
    for sign in ("total", "frequency"):
        want = UB @ merge_utils.ties(cores, torch.tensor(w, dtype=torch.float64), 0.3, sign).numpy() @ VhA
        p = parse_params(algo, {"space": "core", "density": 0.3, "majority_sign": sign, "sign_from": "unweighted"})
        got = algo.merge_module(units, w, p, ctx()).units.delta().double().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6
        default = algo.merge_module(units, w, parse_params(algo, {"space": "core", "density": 0.3,
                                                                  "majority_sign": sign}), ctx())
        assert np.linalg.norm(default.units.delta().double().numpy() - want) / np.linalg.norm(want) > 1e-3


def test_equal_positive_weights_give_the_same_result_either_way():
    units, w = rand_units(60, 90, (4, 4, 4), seed=6), [0.8, 0.8, 0.8]
    a = dense("ties", units, w, density=0.5)
    b = dense("ties", units, w, density=0.5, sign_from="unweighted")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_default_stays_out_of_the_records():
    """Default merges keep their bytes: ``sign_from`` at its default is not written to cards or configs."""
    for method in ("ties", "dare_ties"):
        algo = get_algorithm(method)
        assert "sign_from" not in parse_params(algo, {}).model_dump(by_alias=True)
        p = parse_params(algo, {"sign_from": "unweighted"})
        assert p.model_dump(by_alias=True)["sign_from"] == "unweighted"
        assert parse_params(algo, p.model_dump(by_alias=True)) == p  # the record reads back
