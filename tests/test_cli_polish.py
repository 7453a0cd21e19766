"""What a new user sees: readable help, clean stdout for recipes, plain progress in logs, honest errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import yaml
from sd_helpers import kohya_state_dict, save
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.progress import PlainProgress

runner = CliRunner()
SHIFT, DOUBLE = "examples/tiny-llama-shift", "examples/tiny-llama-double"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mergekit_lora.cli.main", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "80", "OMP_NUM_THREADS": "1"}, **kw)


def test_help_fits_80_columns_and_keeps_every_word():
    for cmd in ("merge", "cluster", "route", "run"):
        r = _cli(cmd, "--help")
        assert r.returncode == 0, r.stderr
        assert max(len(line) for line in r.stdout.splitlines()) <= 80, cmd
        assert "…" not in r.stdout, cmd  # nothing cut
    r = _cli("cluster", "--help")
    assert "features [a/‖a‖; b/‖b‖]" in " ".join(r.stdout.split())  # rich markup used to eat "[...]"
    assert "--ignore-modules-to-save" in r.stdout  # the shared options are the same everywhere
    route = _cli("route", "--help").stdout
    assert "--top-k" in route and "-k," not in route and "--dtype" in route and "--emit-recipe" in route


def test_methods_lists_real_defaults():
    r = runner.invoke(app, ["methods", "--json"])
    described = {m["name"]: m for m in json.loads(r.output)}
    assert described["route"]["parameters"]["top_k_pattern"]["default"] == {}
    assert "Undefined" not in r.output


def test_emit_recipe_to_stdout_is_yaml_alone(tmp_path):
    r = _cli("merge", SHIFT, DOUBLE, "--method", "linear", "-o", tmp_path / "o", "--emit-recipe", "-")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["method"] == "linear" and [a["source"] for a in doc["adapters"]] == [SHIFT, DOUBLE]
    assert "fidelity" in r.stderr and "wrote" in r.stderr


def test_plain_progress_lines_when_not_a_terminal():
    out = io.StringIO()
    with PlainProgress(every=0.0, stream=out) as bar:
        t = bar.add_task("merging (ties)", total=3)
        for _ in range(3):
            bar.advance(t)
    lines = out.getvalue().splitlines()
    assert lines[:3] == [f"merging (ties): {i}/3 after 0 s" for i in (1, 2, 3)]
    from mergekit_lora.progress import progress_bar

    assert isinstance(progress_bar(True), PlainProgress)  # stderr is a pipe under pytest, as in CI logs


def test_llm_and_sd_inputs_name_the_real_problem(tmp_path):
    k = save(tmp_path / "k.safetensors", kohya_state_dict(seed=1))
    for extra in ([], ["--format", "kohya"], ["--format", "diffusers"]):
        r = runner.invoke(app, ["merge", SHIFT, str(k), "-o", str(tmp_path / "o"), *extra])
        assert r.exit_code == 2
        assert "different model families" in r.output and "--format" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_card_lists_only_parameters_that_are_set(tmp_path):
    r = runner.invoke(app, ["merge", SHIFT, DOUBLE, "--method", "linear", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    card = (tmp_path / "o" / "README.md").read_text()
    assert "rank: `None`" not in card and "- method: `linear`" in card


def test_cluster_says_when_k_leaves_modules_unclustered(tmp_path):
    """Rank-4 and rank-8 inputs pool 12 units per module: -k 16 clusters nothing, and the terminal says so."""
    r = runner.invoke(app, ["cluster", SHIFT, DOUBLE, "-k", "16", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "modules not clustered" in r.output
    r = runner.invoke(app, ["cluster", SHIFT, DOUBLE, "-k", "2", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 0 and "modules not clustered" not in r.output
