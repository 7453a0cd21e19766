"""``loramerge tune`` on the tiny Llama (examples/tiny-llama) with a token-id task built here.

Sequential (``use_ray=False``) unless the test is about Ray; Ray tests share one local session.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from ray_fixtures import ray_session  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from mergekit_lora import load_adapter, merge
from mergekit_lora.cli.main import app
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import make_options
from mergekit_lora.registry import get_algorithm
from mergekit_lora.request import MergeRequest
from mergekit_lora.tune.objective import load_objective
from mergekit_lora.tune.search import TuneSettings, run_tune
from mergekit_lora.tune.space import build_space
from mergekit_lora.tune.trials import read_trials

pytest.importorskip("nevergrad")
EXAMPLES = Path(__file__).parents[1] / "examples"
SRC = [str(EXAMPLES / "tiny-llama-shift"), str(EXAMPLES / "tiny-llama-double")]
LABELS = [5, 17, 42]


@pytest.fixture(scope="module")
def objective(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("objective")
    r = random.Random(0)
    rows = []
    for _ in range(16):
        ids = [r.randrange(3, 64) for _ in range(r.randrange(3, 9))]
        rows.append(json.dumps({"ids": ids, "label": sum(ids) % 3}))
    (d / "toy.jsonl").write_text("\n".join(rows) + "\n")
    (d / "obj.yaml").write_text(f"base: {EXAMPLES / 'tiny-llama'}\nmetric: loss\nl1: 0.01\ntasks:\n"
                                f"  - name: toy\n    data: toy.jsonl\n    label_tokens: {LABELS}\n    examples: 12\n")
    return d / "obj.yaml"


def _settings(objective: Path, out: Path, seed: int = 0, **kw) -> TuneSettings:
    request = MergeRequest(sources=SRC, method="ties", params={"density": 0.5},
                           options=make_options(device="cpu", seed=seed))
    base = dict(request=request, objective=str(objective), out=str(out), search=["weights", "density"],
                budget=6, workers=2, use_ray=False)
    base.update(kw)
    return TuneSettings(**base)  # type: ignore[arg-type]


def _trials(out: Path) -> list[dict]:
    """The recorded trials without where/how long they ran."""
    return [{k: v for k, v in r.items() if k not in ("worker", "seconds")} for r in read_trials(out / "trials.jsonl")[1]]


def _best_bytes(out: Path) -> bytes:
    return (out / "best" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def sequential(objective, tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "tune"
    return run_tune(_settings(objective, out)), out


# ---------------------------------------------------------------------------------------------- the search
def test_tune_writes_best_adapter_trials_and_plot(sequential, objective):
    res, out = sequential
    rows = _trials(out)
    assert [r["trial"] for r in rows] == list(range(6))
    assert rows[0]["weights"] == [0.5, 0.5] and rows[0]["params"] == {"density": 0.5}  # trial 0 = the start point
    scored = [r for r in rows if r["score"] is not None]
    assert res.best["score"] == min(r["score"] for r in scored)
    for r in scored:  # objective = mean task loss + l1 Σ|w|
        assert r["score"] == pytest.approx(r["tasks"]["toy"]["loss"] + 0.01 * sum(abs(w) for w in r["weights"]))
        assert all(-1.5 <= w <= 1.5 for w in r["weights"]) and 0 < r["params"]["density"] <= 1
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "best" / "README.md").read_text()
    assert "Tuned with loramerge tune" in card and f"best: trial {res.best['trial']}" in card
    assert card.index("## Tuned with loramerge tune") < card.index("## Recipe")  # a section of the card the
    # pipeline writes inside the atomic swap, not text appended to the published folder afterwards
    assert json.loads((out / "tune.json").read_text())["best"]["trial"] == res.best["trial"]


def test_best_adapter_scores_like_its_trial_under_peft(sequential, objective):
    """Oracle: the written best adapter, attached by PEFT, gives the loss the in-memory trial recorded."""
    from transformers import AutoModelForCausalLM

    from mergekit_lora.evals.tasks import attached, score
    from mergekit_lora.tune.objective import encode_objective

    res, out = sequential
    obj, root = load_objective(objective)
    enc = encode_objective(obj, root, None)["toy"]
    model = AutoModelForCausalLM.from_pretrained(str(EXAMPLES / "tiny-llama"), dtype=torch.float32).eval()
    with attached(model, out / "best") as m:
        s = score(m, enc, batch_size=obj.batch_size)
    assert s.loss == pytest.approx(res.best["tasks"]["toy"]["loss"], rel=1e-5)
    assert s.accuracy == res.best["tasks"]["toy"]["accuracy"]


def test_recipe_reproduces_best_adapter(sequential, tmp_path):
    import yaml

    _, out = sequential
    doc = yaml.safe_load((out / "best" / "recipe.yaml").read_text())
    doc["output"]["path"] = str(tmp_path / "again")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == _best_bytes(out)


def test_ray_gives_the_same_trials_and_bytes_as_sequential(sequential, objective, tmp_path, ray_session):  # noqa: F811
    _, seq_out = sequential
    run_tune(_settings(objective, tmp_path / "ray", use_ray=True))
    assert _trials(tmp_path / "ray") == _trials(seq_out)
    assert _best_bytes(tmp_path / "ray") == _best_bytes(seq_out)
    workers = {r["worker"] for r in read_trials(tmp_path / "ray" / "trials.jsonl")[1]}
    assert workers == {"ray-0", "ray-1"}


def test_resume_after_a_kill_continues_to_the_same_result(sequential, objective, tmp_path):
    """A search killed after 3 trials, mid-write of the 4th, resumes to the uninterrupted result."""
    _, seq_out = sequential
    out = tmp_path / "tune"
    out.mkdir()
    lines = (seq_out / "trials.jsonl").read_text().splitlines()
    (out / "trials.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])  # header + 3 rows + torn row
    kept = read_trials(out / "trials.jsonl")[1]
    with pytest.raises(LoraMergeError, match="resume"):
        run_tune(_settings(objective, out))
    run_tune(_settings(objective, out), resume=True)
    assert _trials(out) == _trials(seq_out)
    assert read_trials(out / "trials.jsonl")[1][:3] == kept  # recorded trials are not re-run
    assert _best_bytes(out) == _best_bytes(seq_out)
    with pytest.raises(LoraMergeError, match="other settings"):
        run_tune(_settings(objective, out, seed=1), resume=True)


def test_a_failing_trial_is_an_error_row_and_the_search_goes_on(objective, tmp_path, monkeypatch):
    from mergekit_lora.distributed import core

    real = core.merged_units
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom in trial")
        return real(*a, **kw)

    monkeypatch.setattr(core, "merged_units", flaky)
    res = run_tune(_settings(objective, tmp_path / "t"))
    rows = _trials(tmp_path / "t")
    assert len(rows) == 6
    bad = [r for r in rows if r["score"] is None]
    assert [r["trial"] for r in bad] == [2] and bad[0]["error"] == "RuntimeError: boom in trial"
    assert res.best["score"] is not None and (tmp_path / "t" / "best" / "adapter_model.safetensors").is_file()


def test_every_trial_failing_is_one_error(objective, tmp_path, monkeypatch):
    from mergekit_lora.distributed import core

    monkeypatch.setattr(core, "merged_units", lambda *a, **k: (_ for _ in ()).throw(ValueError("nope")))
    with pytest.raises(LoraMergeError, match="all 2 trials failed; first error: ValueError: nope"):
        run_tune(_settings(objective, tmp_path / "t", budget=2))


def test_optuna_is_deterministic(objective, tmp_path):
    pytest.importorskip("optuna")
    a = run_tune(_settings(objective, tmp_path / "a", optimizer="optuna", budget=4))
    b = run_tune(_settings(objective, tmp_path / "b", optimizer="optuna", budget=4))
    assert _trials(tmp_path / "a") == _trials(tmp_path / "b") and a.best["trial"] == b.best["trial"]
    assert _trials(tmp_path / "a")[0]["weights"] == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------- user errors
BAD_OBJECTIVES = {
    "tasks: [\n  - {name: x": "not valid YAML (line",
    "- 1\n- 2\n": "expected a mapping",
    "base: m\ntasks: []\n": "tasks: List should have at least 1 item",
    "base: m\nmetric: f1\ntasks: [{suite: topic}]\n": "metric: Input should be 'loss' or 'accuracy'",
    "base: m\ntasks: [{suite: topic, data: x.jsonl}]\n": "give either `suite: TASK` or `data: FILE.jsonl`",
    "base: m\ntasks: [{name: t, data: missing.jsonl, label_tokens: [1, 2]}]\n": "data file missing.jsonl not found",
    "base: m\ntasks: [{suite: nope}]\n": "unknown suite task 'nope'",
    "base: m\ntasks: [{suite: topic}]\nlr: 3\n": "lr: Extra inputs are not permitted",
    "base: m\nl1: -1\ntasks: [{suite: topic}]\n": "l1: Input should be greater than or equal to 0",
}


@pytest.mark.parametrize("text,msg", BAD_OBJECTIVES.items())
def test_bad_objective_is_one_error_line(tmp_path, text, msg):
    (tmp_path / "o.yaml").write_text(text)
    r = CliRunner().invoke(app, ["tune", *SRC, "--objective", str(tmp_path / "o.yaml"), "-o", str(tmp_path / "out"),
                                 "--no-ray"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert lines[0].startswith("error: objective ") and msg in " ".join(lines), r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("ray_flag", ["--no-ray", "--ray"])
def test_device_cuda_without_cuda_is_a_clear_error(objective, tmp_path, ray_flag):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = CliRunner().invoke(app, ["tune", *SRC, "--objective", str(objective), "-o", str(tmp_path / "out"), ray_flag,
                                 "--device", "cuda", "-m", "linear"], env={"RAY_ADDRESS": ""})
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and "CUDA is not available" in r.output, r.output


def test_search_space_from_params_bounds_and_choices():
    ties = build_space(get_algorithm("ties"), ["weights", "density", "majority_sign", "rank"], 3, pooled_rank=12,
                       fixed={"density": 0.4})
    d = {x.name: x for x in ties.dims}
    assert d["density"].kind == "float" and 0 < d["density"].low < 0.01 and d["density"].high == 1.0  # gt=0, le=1
    assert d["density"].init == 0.4
    assert d["majority_sign"].choices == ("total", "frequency")
    assert (d["rank"].low, d["rank"].high) == (1, 12)  # ge=1, upper: the pooled input rank
    assert ties.n_weights == 3 and ties.init_weights == (1 / 3, 1 / 3, 1 / 3)
    lego = build_space(get_algorithm("lego"), ["k", "reweight", "balance_inputs"], 2, pooled_rank=8,
                       ranges={"k": (2, 6)})
    d = {x.name: x for x in lego.dims}
    assert (d["k"].low, d["k"].high) == (2, 6) and d["reweight"].choices == ("paper", "lsq", "none")
    assert d["balance_inputs"].choices == (False, True) and lego.n_weights == 0
    with pytest.raises(LoraMergeError, match="has no parameter 'kk'"):
        build_space(get_algorithm("lego"), ["kk"], 2, pooled_rank=8)
    with pytest.raises(LoraMergeError, match="no upper bound; give one with range lambda=LO:HI|lambda_"):
        build_space(get_algorithm("ties"), ["lambda"], 2, pooled_rank=8)


def test_resume_after_killing_the_process(tmp_path):
    """SIGKILL a running `loramerge tune` after a few trials; --resume finishes it to the uninterrupted result."""
    import os
    import signal
    import subprocess
    import sys
    import time

    r = random.Random(1)
    (tmp_path / "toy.jsonl").write_text("".join(
        json.dumps({"ids": [r.randrange(3, 64) for _ in range(8)], "label": r.randrange(3)}) + "\n" for _ in range(300)))
    (tmp_path / "obj.yaml").write_text(f"base: {EXAMPLES / 'tiny-llama'}\ntasks:\n  - name: toy\n    data: toy.jsonl\n"
                                       f"    label_tokens: {LABELS}\n    examples: 300\n")
    args = ["tune", *SRC, "--objective", str(tmp_path / "obj.yaml"), "-m", "linear", "--budget", "16", "--workers",
            "2", "--no-ray", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_lora.cli.main", *args, "-o", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    trials = tmp_path / "killed" / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if trials.is_file() and len(read_trials(trials)[1]) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search ended before it could be killed"
    recorded = len(read_trials(trials)[1])
    assert 3 <= recorded < 16
    r1 = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "killed"), "--resume"])
    r2 = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "whole")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert _trials(tmp_path / "killed") == _trials(tmp_path / "whole")
    assert _best_bytes(tmp_path / "killed") == _best_bytes(tmp_path / "whole")


@pytest.mark.parametrize("name", ["nevergrad", "optuna"])
def test_optimizers_survive_a_long_batched_search_deterministically(name):
    """64 asks/tells in batches of 2 on a cheap function (no model): no crash, same sequence twice,
    the start point first, every candidate inside the bounds."""
    pytest.importorskip(name)
    from mergekit_lora.tune.optimizers import make_optimizer

    space = build_space(get_algorithm("ties"), ["weights", "density"], 3, pooled_rank=8, fixed={"density": 0.5})

    def run() -> list[dict]:
        opt, seq = make_optimizer(name, space, seed=0, budget=64, workers=2), []
        for _ in range(32):
            asked = [opt.ask() for _ in range(2)]
            for token, v in asked:
                c = space.candidate(v)
                seq.append(c)
                opt.tell(token, sum((w - 0.4) ** 2 for w in c["weights"]) + c["params"]["density"])
        return seq

    a = run()
    assert a == run() and len(a) == 64
    assert a[0] == {"weights": [1 / 3] * 3, "params": {"density": 0.5}}
    assert all(-1.5 <= w <= 1.5 for c in a for w in c["weights"]) and all(0 < c["params"]["density"] <= 1 for c in a)


def test_search_scale_tunes_the_strength_and_the_best_adapter_has_it(objective, tmp_path):
    from mergekit_lora.strength import normalize_scale
    from mergekit_lora.tune.space import split_scale

    space = build_space(get_algorithm("ties"), ["scale"], 2, pooled_rank=8)
    (dim,) = space.dims
    assert (dim.name, dim.kind, dim.low, dim.high, dim.init) == ("scale", "float", 0.25, 4.0, 1.0)
    assert split_scale({"density": 0.5, "scale": 1.5}) == ({"density": 0.5}, "1.5*average")
    out = tmp_path / "tune"
    run_tune(_settings(objective, out, search=["scale"], budget=4, workers=1))
    trials = _trials(out)
    assert len({round(t["params"]["scale"], 6) for t in trials}) > 1  # the strength really varies
    best = min((t for t in trials if t["score"] is not None), key=lambda t: t["score"])
    recipe = (out / "best" / "recipe.yaml").read_text()
    assert f"scale: {normalize_scale(split_scale(best['params'])[1])}\n" in recipe
    # the best adapter is the ties merge at that strength: its norms are F × the average's
    merge(SRC, "ties", tmp_path / "avg", params={"density": 0.5}, scale="average", dtype="float32")
    got, ref = load_adapter(out / "best"), load_adapter(tmp_path / "avg")
    name = got.module_names()[0]
    assert got.units(name).norm() == pytest.approx(best["params"]["scale"] * ref.units(name).norm(), rel=1e-2)
