"""A merge's fidelity summary is cached with the scores, keyed by the merged adapter's and inputs' bytes and
the weights: an `eval compare` re-run with everything cached reports the same numbers without computing
fidelity (issue 25 §4).  The model side of `eval compare` is faked here; the merges and fidelity are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import mergekit_lora.evals.compare as compare
import mergekit_lora.evals.fidelity as fidelity
import mergekit_lora.evals.score_cache as score_cache
import mergekit_lora.evals.suite.model as suite_model
from mergekit_lora.evals.score_cache import cached_fidelity
from mergekit_lora.pipeline import merge

ROOT = Path(__file__).resolve().parents[1]
INPUTS = [ROOT / "examples/suite/topic", ROOT / "examples/suite/language"]


class _Task:
    """What the score key reads of an encoded task (the model side is faked)."""

    def __init__(self, name: str) -> None:
        self.name, self.ids = name, [[1, 2, 3]]
        self.gold = self.label_tokens = torch.tensor([0])


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """An empty cache folder and a counter of fidelity computations."""
    monkeypatch.setenv("LORAMERGE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = fidelity.fidelity_report

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(fidelity, "fidelity_report", counting)
    return calls


def test_cached_fidelity_hits_only_for_the_same_bytes_and_weights(counted, tmp_path):
    merge(INPUTS, "ties", tmp_path / "m", weights=[0.6, 0.4], params={"density": 0.5}, device="cpu")
    first, hit1 = cached_fidelity(tmp_path / "m", INPUTS, [0.6, 0.4])
    second, hit2 = cached_fidelity(tmp_path / "m", INPUTS, [0.6, 0.4])
    assert (hit1, hit2) == (False, True) and len(counted) == 1
    assert second == first  # every float read back exactly
    direct = fidelity.fidelity_report(tmp_path / "m", INPUTS, [0.6, 0.4])
    assert first["overall"] == direct.overall and first["rank"] == max(m.rank for m in direct.modules)
    counted.clear()
    assert not cached_fidelity(tmp_path / "m", INPUTS, [0.5, 0.5])[1]  # other weights: a miss
    merge(INPUTS, "ties", tmp_path / "m", weights=[0.6, 0.4], params={"density": 0.3}, device="cpu", force=True)
    other, hit = cached_fidelity(tmp_path / "m", INPUTS, [0.6, 0.4])  # other bytes: a miss
    assert not hit and other != first
    assert not cached_fidelity(tmp_path / "m", INPUTS, [0.6, 0.4], enabled=False)[1]
    assert len(counted) == 3


def _fake_model_side(monkeypatch, tmp_path):
    """load_base/encode/scoring replaced by constants (the base: an empty folder): only merges and fidelity
    run for real."""
    monkeypatch.setattr(compare, "load_base", lambda base, device: (None, None))
    monkeypatch.setattr(compare, "encode_suite", lambda tok, tasks, n, m: {t: _Task(t) for t in tasks})
    monkeypatch.setattr(compare, "pad_id_of", lambda tok: 0)
    (tmp_path / "base").mkdir()
    monkeypatch.setattr(suite_model, "resolve_base", lambda base: tmp_path / "base")

    def scores(model, base, adapter, enc, *, enabled=True, **ev):
        return {t: {"accuracy": 0.5, "n": 4, "correct": "1010", "loss": 1.0} for t in enc}, sorted(enc)

    monkeypatch.setattr(compare, "cached_scores", scores)


def test_compare_rerun_reads_fidelity_back_and_reports_the_same_numbers(counted, monkeypatch, tmp_path):
    _fake_model_side(monkeypatch, tmp_path)
    cfg = {"base": "fake", "adapters": {"topic": str(INPUTS[0]), "language": str(INPUTS[1])},
           "tasks": ["topic", "language"], "weights": [0.6, 0.4], "device": "cpu", "bootstrap": 0,
           "methods": ["linear", "svd", {"method": "ties", "params": {"density": 0.5}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config, root = compare.load_config(tmp_path / "c.yaml")
    reports = []
    for run in ("first", "again"):
        compare.run_compare(config, root, tmp_path / run, log=lambda m: None)
        reports.append(json.loads((tmp_path / run / "report.json").read_text()))
    assert len(counted) == 3  # the first run only: one per merge

    def numbers(rep):
        timing = ("merge_seconds", "fidelity_seconds", "eval_seconds")
        return [{k: v for k, v in r.items() if k not in timing} for r in rep["rows"]]

    assert numbers(reports[0]) == numbers(reports[1])
    merges = [r for r in reports[1]["rows"] if r["kind"] == "merge"]
    assert [r["variant"] for r in merges] == ["linear", "svd", "ties"] and all("error" not in r for r in merges)
    assert merges[0]["fidelity"]["rel_error"] < 1e-3 < merges[2]["fidelity"]["rel_error"]
    assert all(r["rank"] > 0 for r in merges)


def test_compare_rerun_with_every_score_cached_merges_nothing(monkeypatch, tmp_path):
    """The merge itself is skipped when its record and every score of its output are cached: no merge call,
    no output folder, and the report's numbers are the first run's."""
    monkeypatch.setenv("LORAMERGE_CACHE", str(tmp_path / "cache"))
    _fake_model_side(monkeypatch, tmp_path)
    monkeypatch.setattr(compare, "cached_scores", score_cache.cached_scores)  # the real score cache
    scored: list[str] = []

    def evaluate(model, adapter, enc, **ev):
        scored.append(str(adapter))
        return {t: {"accuracy": len(scored) / 100, "n": 4, "correct": "1010", "loss": 1.0} for t in enc}

    monkeypatch.setattr(score_cache, "evaluate_variant", evaluate)
    merged: list[str] = []

    def counting_merge(request, *a, **kw):
        merged.append(request.method)
        return merge(request, *a, **kw)

    monkeypatch.setattr(compare, "merge", counting_merge)
    cfg = {"base": "fake", "adapters": {"topic": str(INPUTS[0]), "language": str(INPUTS[1])},
           "tasks": ["topic", "language"], "weights": [0.6, 0.4], "device": "cpu", "bootstrap": 0,
           "methods": ["linear", {"method": "ties", "params": {"density": 0.5}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config, root = compare.load_config(tmp_path / "c.yaml")
    reports = []
    for run in ("first", "again"):
        compare.run_compare(config, root, tmp_path / run, log=lambda m: None)
        reports.append(json.loads((tmp_path / run / "report.json").read_text()))
        if run == "first":
            assert merged == ["linear", "ties"] and len(scored) == 5  # base, 2 inputs, 2 merges
    assert merged == ["linear", "ties"] and len(scored) == 5  # the re-run merged and scored nothing
    rows = [r for r in reports[1]["rows"] if r["kind"] == "merge"]
    assert [r["merge_cached"] for r in rows] == [True, True]

    def numbers(rep):
        provenance = ("merge_seconds", "fidelity_seconds", "eval_seconds", "cached", "merge_cached")
        return [{k: v for k, v in r.items() if k not in provenance} for r in rep["rows"]]

    assert numbers(reports[0]) == numbers(reports[1])
    # other parameters: a new merge
    cfg["methods"] = [{"method": "ties", "params": {"density": 0.3}}]
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(cfg))
    config, root = compare.load_config(tmp_path / "c2.yaml")
    compare.run_compare(config, root, tmp_path / "third", log=lambda m: None)
    assert merged == ["linear", "ties", "ties"]
