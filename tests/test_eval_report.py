"""The report's statistics (bootstrap intervals, paired differences) and its self-contained HTML page.

The statistics are checked against direct computations on synthetic per-example outcomes; the HTML page
is rendered by a real browser (headless Chromium, Debian's ``chromium``), which must see the table, the
sorting script having run, and both plots.  The browser test skips when no Chromium is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from mergekit_lora.evals.report import markdown, write_report
from mergekit_lora.evals.report_html import html
from mergekit_lora.evals.stats import (
    add_intervals,
    best_static,
    interval,
    normalized_samples,
    outcome_array,
    resample_indices,
)

TASKS = ["a", "b"]


def _bits(rng, n, p):
    return "".join("1" if x else "0" for x in rng.random(n) < p)


def _report(n=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"variant": "base", "kind": "base", "tasks": {t: {"correct": _bits(rng, n, 0.5)} for t in TASKS}},
            {"variant": "a", "kind": "individual", "rank": 8, "tasks": {"a": {"correct": _bits(rng, n, 0.9)}}},
            {"variant": "b", "kind": "individual", "rank": 16, "tasks": {"b": {"correct": _bits(rng, n, 0.8)}}}]
    for name, method, p, rank in (("linear", "linear", 0.75, 24), ("svd", "svd", 0.7, 8),
                                  ("lego", "lego", 0.72, 8), ("ties<x>", "ties", 0.6, 8)):
        rows.append({"variant": name, "kind": "merge", "method": method, "rank": rank,
                     "fidelity": {"rel_error": 0.1, "energy": 0.9, "cos": [1, 1], "projection": [1, 1]},
                     "merge_seconds": 0.5, "tasks": {t: {"correct": _bits(rng, n, p)} for t in TASKS}})
    rows.append({"variant": "broken", "kind": "merge", "method": "dare_ties", "error": "ValueError: <bad>"})
    rows[-2]["tuned"] = True
    for r in rows:
        for t in r.get("tasks", {}).values():
            t["accuracy"] = outcome_array(t["correct"]).mean()
    own = {t: t for t in TASKS}
    for r in rows:
        if "tasks" in r and all(t in r["tasks"] for t in TASKS):
            r["mean_accuracy"] = float(np.mean([r["tasks"][t]["accuracy"] for t in TASKS]))
            r["normalized_accuracy"] = float(np.mean([r["tasks"][t]["accuracy"] / rows[1 + i]["tasks"][t]["accuracy"]
                                                      for i, t in enumerate(TASKS)]))
    add_intervals(rows, TASKS, own, resamples=500, seed=0)
    cfg = {"base": "tiny", "examples": n, "seed": 0, "weights": None, "bootstrap": 500, "validation": 50,
           "adapters": {"a": "x", "b": "y"}}
    return {"config": cfg, "device": "cpu", "tasks": TASKS, "own": own, "rows": rows}


def test_outcomes_and_resamples():
    assert outcome_array("0110").tolist() == [0, 1, 1, 0]
    idx = resample_indices({"a": 5, "b": 3}, 4, seed=1)
    assert idx["a"].shape == (4, 5) and idx["b"].shape == (4, 3)
    assert idx["a"].min() >= 0 and idx["a"].max() < 5
    again = resample_indices({"a": 5, "b": 3}, 4, seed=1)
    assert all((idx[t] == again[t]).all() for t in idx)  # fixed seed, same draws


def test_normalized_samples_by_hand():
    correct = {"a": np.array([1.0, 0, 1, 1]), "b": np.array([0.0, 1])}
    own = {"a": np.array([1.0, 1, 1, 0]), "b": np.array([1.0, 1])}
    idx = {"a": np.array([[0, 1, 2, 3], [0, 0, 0, 0]]), "b": np.array([[0, 1], [1, 1]])}
    s = normalized_samples(correct, own, idx)
    # resample 0: a 0.75/0.75, b 0.5/1 -> 0.75; resample 1: a 1/1, b 1/1 -> 1
    assert s.tolist() == pytest.approx([0.75, 1.0])
    assert interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])


def test_intervals_and_paired_difference():
    rep = _report()
    rows = {r["variant"]: r for r in rep["rows"]}
    best = best_static(rep["rows"])
    assert best is rows["linear"]  # the highest static merge; lego is not static
    for name in ("base", "linear", "svd", "lego", "ties<x>"):
        lo, hi = rows[name]["norm_ci"]
        assert lo <= rows[name]["normalized_accuracy"] <= hi
        assert 0.02 < hi - lo < 0.3  # 200 examples per task: a few points wide
    assert "paired" not in rows["linear"] and "norm_ci" not in rows["a"]  # own-task-only rows have no mean
    p = rows["svd"]["paired"]
    assert p["vs"] == "linear"
    assert p["diff"] == pytest.approx(rows["svd"]["normalized_accuracy"] - rows["linear"]["normalized_accuracy"])
    assert p["ci"][0] <= p["diff"] <= p["ci"][1]
    assert rows["ties<x>"]["paired"]["ci"][1] < 0  # 0.6 vs 0.75 on 400 examples: clearly worse
    assert rows["ties<x>"]["paired"]["p_better"] < 0.01
    # pairing: a variant identical to the baseline differs by exactly 0 in every resample
    twin = dict(rows["linear"], variant="twin", tuned=False)
    rep["rows"].append(twin)
    add_intervals(rep["rows"], TASKS, rep["own"], resamples=200, seed=0)
    assert twin["paired"]["ci"] == [0.0, 0.0]


def test_paired_at_equal_rank():
    """Merges are also compared with the best static merge of their own output rank (same resamples)."""
    rep = _report()
    rows = {r["variant"]: r for r in rep["rows"]}
    # rank 8: svd (0.7) beats ties (0.6); lego is not static, so svd is its equal-rank reference
    pr = rows["lego"]["paired_rank"]
    assert pr["vs"] == "svd" and rows["lego"]["paired"]["vs"] == "linear"
    assert pr["diff"] == pytest.approx(rows["lego"]["normalized_accuracy"] - rows["svd"]["normalized_accuracy"])
    assert pr["ci"][0] <= pr["diff"] <= pr["ci"][1]
    assert rows["svd"]["paired_rank"]["vs"] == "ties<x>"  # not itself
    assert "paired_rank" not in rows["linear"]  # no other static merge of rank 24
    assert "paired_rank" not in rows["base"]
    md = markdown(rep)
    assert "svd: " + f"{pr['diff']:+.3f}" in md and "Δ vs best static of equal rank" in md


def test_rerender_recomputes_the_statistics(tmp_path):
    """`eval report` reads a report.json back (no model) and writes the same statistics and files."""
    import json

    from typer.testing import CliRunner

    from mergekit_lora.cli.main import app

    rep = _report()
    for r in rep["rows"]:
        r.pop("paired_rank", None)  # as written before the column existed
    (tmp_path / "report.json").write_text(json.dumps(rep))
    res = CliRunner().invoke(app, ["eval", "report", str(tmp_path / "report.json"), "-o", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "r" / "report.json").read_text())
    fresh = _report()
    for a, b in zip(again["rows"], fresh["rows"]):
        assert a.get("norm_ci") == pytest.approx(b.get("norm_ci")) and a.get("paired") == b.get("paired")
        assert a.get("paired_rank") == b.get("paired_rank")
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.md", "report.png", "report.json", "report.html"}
    bad = CliRunner().invoke(app, ["eval", "report", str(tmp_path / "r" / "report.md"), "-o", str(tmp_path / "s")])
    assert bad.exit_code == 2 and "not a report.json" in bad.output and not (tmp_path / "s").exists()


def test_markdown_marks_tuned_rows_and_intervals():
    md = markdown(_report())
    assert "| ties<x>* |" in md  # tuned rows carry a *
    svd = next(line for line in md.splitlines() if line.startswith("| svd |"))
    assert re.search(r"\[0\.\d{3}, [01]\.\d{3}\]", svd) and re.search(r"[+-]0\.\d{3} \[[+-]0\.\d{3}, [+-]0\.\d{3}\]", svd)
    assert "failed: ValueError" in md


def test_html_is_self_contained(tmp_path):
    rep = _report()
    write_report(rep, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "report.png", "report.html"}
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing fetched from anywhere
    assert "ties&lt;x&gt;*" in page and "ties<x>" not in page  # names are escaped
    assert page.count("<tr class=") == len(rep["rows"])
    assert 'id="per-task-bars"' in page and 'id="quality-vs-rank"' in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.mark.skipif(_chromium() is None, reason="no chromium installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(tmp_path):
    rep = _report()
    (tmp_path / "report.html").write_text(html(rep), encoding="utf-8")
    browser = _chromium()
    profile = tmp_path / "profile"
    run = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=2000",
                          "--dump-dom", (tmp_path / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    dom = run.stdout
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'data-ready="1"' in dom  # the page's script ran (sorting handlers attached)
    table = re.search(r'<table id="results">.*?</table>', dom, re.S)
    assert table is not None
    body = re.search(r"<tbody>(.*)</tbody>", table.group(0), re.S).group(1)
    assert body.count("<tr") == len(rep["rows"])
    assert "[0." in body  # intervals shown
    bars = re.search(r'<svg id="per-task-bars".*?</svg>', dom, re.S)
    assert bars is not None and bars.group(0).count('class="bar"') == 2 * 5 + 2  # 5 full rows × 2 tasks + 2 own
    rank = re.search(r'<svg id="quality-vs-rank".*?</svg>', dom, re.S)
    assert rank is not None and rank.group(0).count('class="point"') == 4  # the merges (base: no rank; own-task rows: no mean)
    shot = tmp_path / "shot.png"
    run = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                          "--window-size=1400,1200", (tmp_path / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    bar_orange = np.all(np.abs(img - np.array([0xDD, 0x84, 0x52])) < 8, axis=-1)
    assert bar_orange.sum() > 500  # the merge bars were painted, not just present in the DOM
