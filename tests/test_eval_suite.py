"""The packaged data loaders (counts, label sets) and one smoke run of the real suite (SmolLM2, 2 tasks × 32).

The smoke test converts the packaged GGUF once into the repo's ignored ``.cache/`` (~20 s), then
loads it in well under a second on later runs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.evals.suite.data import TASKS, TEST_SIZE, get_task

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {  # task: (examples, classes, smallest class)
    "topic": (2125, 5, 347),  # 2,225 articles, 100 exact duplicates dropped
    "sentiment": (1830, 2, 834),
    "genre": (2398, 4, 598),
    "language": (1438, 6, 188),
    "script": (1200, 8, 150),  # 150 letters per writing system
    "polarity": (1999, 2, 999),  # "sugarcoat"/"sugarcoated" style duplicates are distinct words
    "region": (898, 8, 78),  # Thailand's 78 provinces
    "subject": (1093, 6, 108),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loader_counts_and_labels(name):
    task = get_task(name)
    ex = task.examples()
    n, classes, smallest = EXPECTED[name]
    assert len(ex) == n
    counts = Counter(e.label for e in ex)
    assert sorted(counts) == list(range(classes)) == list(range(len(task.labels)))
    assert min(counts.values()) == smallest  # every class is well represented
    train, test = task.split()
    assert len(test) == TEST_SIZE and len(train) == n - TEST_SIZE
    assert not {e.text for e in test} & {e.text for e in train}  # no leakage
    assert all(e.text.strip() for e in ex)
    assert task.examples() == ex  # fixed order
    assert task.validation(40) == train[:40]  # the tuning slice comes from the train split


def test_unknown_task():
    with pytest.raises(LoraMergeError, match="unknown task"):
        get_task("nope")
    assert set(TASKS) == set(EXPECTED)


def test_suite_smoke_real_model(tmp_path):
    """SmolLM2 + the committed adapters on 2 tasks × 32 examples, through `eval compare`: inputs scored on
    their own task only, a reference adapter, a grid-tuned row chosen on the validation slice, intervals."""
    from mergekit_lora.evals.compare import load_config, run_compare

    cfg = {
        "base": "smollm2-135m",
        "adapters": {"topic": str(ROOT / "examples/suite/topic"), "language": str(ROOT / "examples/suite/language")},
        "references": {"genre": str(ROOT / "examples/suite/genre")},
        "methods": ["linear", {"method": "linear", "label": "again"},
                    {"method": "linear", "label": "broken", "params": {"rank": 0}},
                    {"method": "linear", "label": "tuned", "grid": {"weight": ["1/n", 1]}}],
        "weights": [0.5, 0.5], "examples": 32, "batch_size": 16, "device": "cpu", "individual": "own",
        "validation": 8, "bootstrap": 200,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    config, root = load_config(tmp_path / "c.yaml")
    rep = run_compare(config, root, tmp_path / "report", log=lambda m: None)
    rows = {r["variant"]: r for r in rep["rows"]}
    assert sorted(rep["tasks"]) == ["language", "topic"]
    for task in ("topic", "language"):
        # each trained adapter beats the base model on its own task by a wide margin
        assert rows[task]["tasks"][task]["accuracy"] >= rows["base"]["tasks"][task]["accuracy"] + 0.15
        assert rows[task]["tasks"][task]["n"] == 32
        assert set(rows[task]["tasks"]) == {task}  # individual: own
        assert rows[task]["rank"] == 8
        for r in (rows["base"], rows["linear"], rows["genre"]):
            c = r["tasks"][task]["correct"]
            assert len(c) == 32 and c.count("1") / 32 == pytest.approx(r["tasks"][task]["accuracy"])
    assert rows["genre"]["kind"] == "reference" and set(rows["genre"]["tasks"]) == {"topic", "language"}
    assert rows["linear"]["fidelity"]["rel_error"] < 1e-3
    assert 0.5 < rows["linear"]["normalized_accuracy"] <= 1.2
    lo, hi = rows["linear"]["norm_ci"]
    assert lo <= rows["linear"]["normalized_accuracy"] <= hi
    tuned = rows["tuned"]
    assert tuned["tuned"] is True and [s["setting"] for s in tuned["tuning"]["scores"]] == [{"weight": 0.5},
                                                                                          {"weight": 1}]
    best = max(tuned["tuning"]["scores"], key=lambda s: s["validation_accuracy"])
    assert tuned["tuning"]["chosen"] == best["setting"] and tuned["weights"] == [best["setting"]["weight"]] * 2
    assert "error" in rows["broken"] and "rank" in rows["broken"]["error"]
    # the same merge again (same bytes) is not re-scored: its scores come from the cache, equal
    assert rows["again"]["cached"] == ["language", "topic"] and rows["again"]["tasks"] == rows["linear"]["tasks"]
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"report.md", "report.png", "report.json",
                                                                "report.html"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| linear |" in md and "| tuned* |" in md


def test_cli_eval_tasks_json():
    """`loramerge eval tasks` end to end on one task × 8 examples (base + the task's own adapter)."""
    import json

    from typer.testing import CliRunner

    from mergekit_lora.cli.main import app

    r = CliRunner().invoke(app, ["eval", "tasks", "--base", "smollm2-135m", "--adapter",
                                 f"language={ROOT / 'examples/suite/language'}", "--task", "language", "-n", "8",
                                 "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # progress and warnings go to stderr
    assert set(out["matrix"]) == {"base", "language"} and out["own"] == {"language": "language"}
    assert out["matrix"]["language"]["language"]["n"] == 8
    assert out["matrix"]["language"]["language"]["loss"] < out["matrix"]["base"]["language"]["loss"]
    r = CliRunner().invoke(app, ["eval", "tasks", "--base", "smollm2-135m", "--task", "nope"])
    assert r.exit_code == 2 and "unknown task" in r.output
