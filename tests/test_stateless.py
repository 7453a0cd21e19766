"""Algorithms are stateless (docs/ARCHITECTURE.md): one instance merges any number of plans with the results of
fresh instances; its only attributes are private scratch buffers (lego's reused pool workspace)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import make_peft_adapter

from mergekit_lora.pipeline import MergeRequest, execute, make_options, plan

METHODS = {
    "linear": {}, "cat": {}, "svd": {"rank": 4}, "lego": {"k": 4}, "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5}, "magnitude_prune": {"density": 0.5}, "route": {"top_k": 2},
    "knots_ties": {"density": 0.5}, "tsv": {}, "iso_c": {"rank": 4}, "iso_cts": {},
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stateless")
    return [make_peft_adapter(tmp / f"a{i}", seed=i) for i in range(3)]


def _merged(p) -> dict[str, torch.Tensor]:
    out = {}
    for n, u in sorted(execute(p).merged.items()):
        out[n] = (u.units if hasattr(u, "units") else u).delta()  # routed modules hold their pooled units
    return out


def _public(algo) -> dict:
    return {k: v for k, v in vars(algo).items() if not k.startswith("_")}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_instance_merges_many_plans(adapters, method):
    opts = make_options(seed=3, device="cpu")
    first = plan(MergeRequest(sources=adapters[:2], method=method, params=METHODS[method], weights=[0.7, 0.3],
                              options=opts))
    second = plan(MergeRequest(sources=adapters[1:], method=method, params=METHODS[method], weights=[0.4, 0.6],
                               options=opts))
    algo = first.algorithm
    assert _public(algo) == {}
    _merged(first)
    shared = _merged(replace(second, algorithm=algo))  # the instance that merged `first`
    assert _public(algo) == {}
    fresh = _merged(second)
    assert shared.keys() == fresh.keys()
    for n in fresh:
        assert torch.equal(shared[n], fresh[n]), n
