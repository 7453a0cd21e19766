"""A merge's fidelity summary is cached with the scores, keyed by the merged adapter's and inputs' bytes and
the weights: an `eval compare` re-run with everything cached reports the same numbers without computing
fidelity (issue 25 §4).  The model side of `eval compare` is faked here; the merges and fidelity are real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import mergekit_lora.evals.compare as compare
import mergekit_lora.evals.fidelity as fidelity
import mergekit_lora.evals.suite.model as suite_model
from mergekit_lora.evals.score_cache import cached_fidelity
from mergekit_lora.pipeline import merge

ROOT = Path(__file__).resolve().parents[1]
INPUTS = [ROOT / "examples/suite/topic", ROOT / "examples/suite/language"]


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


def _fake_model_side(monkeypatch):
    """load_base/encode/scoring replaced by constants: only merges and fidelity run for real."""
    monkeypatch.setattr(compare, "load_base", lambda base, device: (None, None))
    monkeypatch.setattr(compare, "encode_suite", lambda tok, tasks, n, m: {t: t for t in tasks})
    monkeypatch.setattr(compare, "pad_id_of", lambda tok: 0)
    monkeypatch.setattr(suite_model, "resolve_base", lambda base: Path(base))

    def scores(model, base, adapter, enc, *, enabled=True, **ev):
        return {t: {"accuracy": 0.5, "n": 4, "correct": "1010", "loss": 1.0} for t in enc}, sorted(enc)

    monkeypatch.setattr(compare, "cached_scores", scores)


def test_compare_rerun_reads_fidelity_back_and_reports_the_same_numbers(counted, monkeypatch, tmp_path):
    _fake_model_side(monkeypatch)
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
