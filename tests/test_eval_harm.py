"""Harm outside the merged tasks (generic perplexity) and the paired mean-accuracy difference to the average."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_llama

from mergekit_lora.evals.harm import generic_passages, perplexity
from mergekit_lora.evals.report_text import harm_text, mean_text
from mergekit_lora.evals.stats import add_paired_mean, outcome_array


def test_generic_passages_are_prose_and_fixed():
    a, b = generic_passages(12), generic_passages(12)
    assert a == b and len(a) == 12
    assert all(len(p.split()) >= 40 for p in a)


def test_perplexity_is_exp_of_the_mean_token_nll_with_padding_ignored():
    model = tiny_llama(0)
    rows = [[5, 9, 3, 7, 1], [2, 8, 4]]
    got = perplexity(model, rows, device=torch.device("cpu"), pad_id=0, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:  # one sequence at a time: no padding at all
            logp = torch.log_softmax(model(input_ids=torch.tensor([r])).logits[0, :-1].double(), -1)
            nll -= float(logp[torch.arange(len(r) - 1), torch.tensor(r[1:])].sum())
            n += len(r) - 1
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert 1 < got < 97 * 5  # a random 97-token model is near-uniform


def _row(name, bits_by_task):
    return {"variant": name, "kind": "merge",
            "tasks": {t: {"correct": b, "accuracy": outcome_array(b).mean()} for t, b in bits_by_task.items()}}


def test_paired_mean_difference_against_the_reference_row():
    rng = np.random.default_rng(0)
    bits = lambda p: "".join("1" if x else "0" for x in rng.random(300) < p)  # noqa: E731
    rows = [_row("linear", {"a": bits(0.6), "b": bits(0.7)}), _row("better", {"a": bits(0.8), "b": bits(0.9)}),
            _row("same", {})]
    rows[2]["tasks"] = rows[0]["tasks"]
    add_paired_mean(rows, ["a", "b"], "linear", resamples=400)
    want = np.mean([rows[1]["tasks"][t]["accuracy"] - rows[0]["tasks"][t]["accuracy"] for t in "ab"])
    p = rows[1]["paired_mean"]
    assert p["vs"] == "linear" and p["diff"] == pytest.approx(want) and p["ci"][0] > 0.1
    assert rows[2]["paired_mean"]["diff"] == 0 and rows[2]["paired_mean"]["ci"] == [0.0, 0.0]
    assert "paired_mean" not in rows[0]
    assert mean_text(rows[1]).startswith(f"{100 * want:+.1f} [")


def test_harm_text_is_ratio_and_points_against_the_base():
    assert harm_text({"ppl": 12.0, "unseen": {"x": 0.5}}, {"ppl": 10.0, "unseen": {"x": 0.6}}) == ["1.200", "-10.0"]
    assert harm_text({}, {"ppl": 10.0}) == ["–", "–"]
