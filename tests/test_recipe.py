"""YAML recipes: every problem at once with its line, overrides + gradients, recipe == CLI bytes."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergekit_lora import load_adapter
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.formats.registry import writable
from mergekit_lora.pipeline import execute, plan_recipe
from mergekit_lora.recipe import validate_recipe
from mergekit_lora.recipe.gradients import at
from mergekit_lora.registry import available

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with the example adapters at ``examples/`` and no Hub token."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(EXAMPLES)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    return tmp_path


def cli(*args: str):
    from mergekit_lora.cli.main import app

    return runner.invoke(app, list(args))


def problems(text: str, **kw) -> str:
    with pytest.raises(LoraMergeError) as e:
        plan_recipe(textwrap.dedent(text).lstrip(), "r.yaml", **kw)
    return str(e.value)


BROKEN = [
    pytest.param("""
        method: linear
        adapters:
          - source: examples/tiny-llama-shift
            weight: [1.0]
            colour: red
          - source: ./nope.safetensors
            weight: "heavy"
        parameters: {rank: [2, 0], k: 3}
        modules:
          - match: "re:("
            weights: [1.0]
          - match: "*.mlp.*"
        output: {path: out, dtype: fp8, format: onnx}
        seed: zero
        missing: sometimes
        """, """r.yaml: 13 problems in the recipe:
  - adapters[0].weight (line 4): expected a number or a list of at least two numbers (a layer gradient)
  - adapters[0].colour (line 5): unknown key 'colour'; expected one of: source, weight
  - adapters[1].source (line 6): ./nope.safetensors: no such file or folder
  - adapters[1].weight (line 7): expected a number or a list of at least two numbers (a layer gradient) (got 'heavy')
  - parameters.k (line 8): method 'linear' does not take 'k'; it takes: rank
  - parameters.rank[1] (line 8): Input should be greater than or equal to 1 (got 0)
  - modules[0].match (line 10): invalid regular expression: missing ), unterminated subpattern at position 0
  - modules[0].weights (line 11): got 1 weight for 2 adapters; give one weight per adapter
  - modules[1] (line 12): an override needs parameters or weights (or both)
  - output.format (line 13): unknown output format 'onnx'; available: {FORMATS}
  - output.dtype (line 13): unknown dtype 'fp8'; use one of bf16, bfloat16, float16, float32, float64, fp16, fp32
  - seed (line 14): Input should be a valid integer, unable to parse string as an integer (got 'zero')
  - missing (line 15): must be union, intersection or error (got 'sometimes')""", id="many"),
    pytest.param("""
        method: nope
        adapters: []
        parameters: {rank: 2}
        """, """r.yaml: 3 problems in the recipe:
  - output (line 1): required key is missing
  - method (line 1): unknown method 'nope'; available: {METHODS}
  - adapters (line 2): list at least one adapter (source and weight)""", id="method-and-missing"),
    pytest.param("""
        method: cat
        adapters:
          - {source: examples/tiny-llama-shift}
        parameters:
          rank: 4
        output:
          path: o
          push_to_hub: not a repo
        """, """r.yaml: 2 problems in the recipe:
  - parameters.rank (line 5): method 'cat' does not take 'rank'; it takes no parameters
  - output.push_to_hub (line 8): 'not a repo' is not a Hub repo id; use org/name""", id="cat-no-params"),
    pytest.param("""
        method: linear
        adapters:
          - {source: examples/tiny-llama-shift}
        output: {path: o, push_to_hub: org/merged}
        """, "r.yaml: output.push_to_hub (line 4): pushing needs a token: set HF_TOKEN (a write token) or run "
        "`hf auth login`", id="push-without-token"),
    pytest.param("""
        method: cat
        method: linear
        adapters:
          - {source: examples/tiny-llama-shift}
        modules:
          - match: "*q_proj"
            parameters: {rank: [4, -1]}
        output: {path: o}
        """, """r.yaml: 2 problems in the recipe:
  - method (line 2): duplicate key; keep one
  - modules[0].parameters.rank[1] (line 7): Input should be greater than or equal to 1 (got -1)""", id="dup-and-gradient"),
    pytest.param("method: [linear\n", "r.yaml: not valid YAML (line 2, column 1): expected ',' or ']', but got "
                 "'<stream end>'", id="syntax"),
    pytest.param("- linear\n", "r.yaml: (top level) (line 1): a recipe is a mapping with method, adapters and "
                 "output keys", id="not-a-mapping"),
    # header-level checks (after the schema passed)
    pytest.param("""
        method: linear
        base_model: org/other-base
        adapters:
          - {source: examples/tiny-llama-shift}
        output: {path: o}
        """, "r.yaml: base_model (line 2): the recipe says org/other-base but adapters[0] (examples/tiny-llama-shift) "
        "was trained on examples/tiny-llama; fix base_model or the input", id="base-model"),
    pytest.param("""
        method: linear
        adapters:
          - {source: examples/tiny-llama-shift}
        modules:
          - {match: "*.mlp.*", parameters: {rank: 2}}
        output: {path: o}
        """, "r.yaml: modules[0].match (line 5): '*.mlp.*' matches no module of the inputs; fix the pattern or "
        "remove the override (see `loramerge inspect --modules`)", id="override-matches-nothing"),
]


@pytest.mark.parametrize("text,expected", BROKEN)
def test_broken_recipes_report_every_problem_with_lines(work, text, expected):
    # The lists of methods and formats grow as others register theirs.
    expected = expected.replace("{METHODS}", ", ".join(available())).replace("{FORMATS}", ", ".join(sorted(writable())))
    assert problems(text) == expected
    assert not (work / "o").exists() and not (work / "out").exists()


def test_existing_output_needs_force(work):
    (work / "o").mkdir()
    text = "method: linear\nadapters:\n  - {source: examples/tiny-llama-shift}\noutput: {path: o}\n"
    assert problems(text) == ("r.yaml: output.path (line 4): o already exists; choose another output or pass force "
                              "to replace it")  # plan's own check and wording (the CLI writes --force)
    validate_recipe(text, "r.yaml", force=True)  # no error
    (work / "r.yaml").write_text(text)
    r = cli("run", "r.yaml")
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_gradient_interpolation():
    assert [at([2, 6], t) for t in (0, 0.25, 0.5, 0.75, 1)] == [2, 3, 4, 5, 6]
    assert [at([1, 4], t) for t in (0, 0.25, 0.5, 0.75, 1)] == [1, 2, 3, 3, 4]  # 1.75→2, 2.5→3 (half up), 3.25→3
    assert [at([0.0, 1.0, 0.0], t) for t in (0, 0.25, 0.5, 0.75, 1)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert at(0.7, 0.3) == 0.7 and at([0.1, 0.7], 1.0) == 0.7


def five_layer_adapter(path: Path, seed: int, r: int = 4, d: int = 8) -> Path:
    """A PEFT adapter (safetensors + config) on a 5-layer Llama-style module layout."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(5):
        for m in ("self_attn.q_proj", "mlp.up_proj"):
            key = f"base_model.model.model.layers.{i}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, d, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(d, r, generator=g)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "up_proj"],
        "base_model_name_or_path": "org/base5", "task_type": "CAUSAL_LM"}))
    return path


GRADIENT_RECIPE = """\
method: linear
base_model: org/base5
adapters:
  - source: a
    weight: [1.0, 0.0]
  - source: b
    weight: 0.5
parameters:
  rank: [2, 6]
modules:
  - match: "*.mlp.up_proj"
    parameters: {rank: [1, 4]}
  - match: "re:layers\\\\.[34]\\\\."
    weights: [0.25, [0.0, 1.0, 0.0]]
output: {path: merged}
seed: 3
"""


def test_overrides_and_gradients_resolve_to_expected_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    five_layer_adapter(tmp_path / "a", 1)
    five_layer_adapter(tmp_path / "b", 2)
    (tmp_path / "r.yaml").write_text(GRADIENT_RECIPE)
    _, res = plan_recipe("r.yaml")
    got = {row.name: (row.params.rank, row.weights, row.override) for row in res.modules}
    q, up = "model.layers.{}.self_attn.q_proj", "model.layers.{}.mlp.up_proj"
    expected = {
        q.format(0): (2, (1.0, 0.5), None), up.format(0): (1, (1.0, 0.5), 0),
        q.format(1): (3, (0.75, 0.5), None), up.format(1): (2, (0.75, 0.5), 0),
        q.format(2): (4, (0.5, 0.5), None), up.format(2): (3, (0.5, 0.5), 0),
        q.format(3): (5, (0.25, 0.5), 1), up.format(3): (3, (0.25, 0.5), 0),  # first match wins: mlp override
        q.format(4): (6, (0.25, 0.0), 1), up.format(4): (4, (0.0, 0.5), 0),
    }
    assert got == expected
    assert res.matched == {0: 5, 1: 2}

    # The merge applies exactly these per-module ranks and weights.
    execute(res)
    out = load_adapter("merged")
    a, b = load_adapter("a"), load_adapter("b")
    for name, (rank, (wa, wb), _) in expected.items():
        assert out.modules[name].rank == rank
        target = wa * a.units(name).delta() + wb * b.units(name).delta()
        s = torch.linalg.svdvals(target.double())
        best = float(s[rank:].norm() / s.norm()) if float(s.norm()) > 0 else 0.0
        err = float((out.units(name).delta().double() - target.double()).norm() / target.double().norm())
        assert err == pytest.approx(best, abs=1e-5), name  # Eckart–Young optimum at that module's rank
    assert (tmp_path / "merged" / "recipe.yaml").read_text() == GRADIENT_RECIPE
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "## Recipe" in card and 'match: "*.mlp.up_proj"' in card and "base_model: org/base5" in card


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    five_layer_adapter(tmp_path / "a", 1)
    five_layer_adapter(tmp_path / "b", 2)
    (tmp_path / "r.yaml").write_text(GRADIENT_RECIPE)
    r = cli("run", "r.yaml", "--dry-run")
    assert r.exit_code == 0, r.output
    assert "modules[0]" in r.output and "modules[1]" in r.output and "rank=6" in r.output
    assert "dry run" in r.output and not (tmp_path / "merged").exists()
    # at 80 columns every module name is still there whole (wrapped inside its cell, never cut with "…")
    import os
    import subprocess
    import sys

    narrow = subprocess.run([sys.executable, "-m", "mergekit_lora.cli.main", "run", "r.yaml", "--dry-run"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout and "model.layers.4.self_attn.q_proj" in narrow.stdout


@pytest.mark.parametrize("method,extra", [("linear", ["--rank", "5"]), ("cat", [])])
def test_recipe_and_cli_give_identical_bytes(work, method, extra):
    args = ["merge", "examples/tiny-llama-shift", "examples/tiny-llama-double", "--method", method,
            "--weights", "0.7,0.3", "--seed", "5", "--dtype", "float32", "-o", "out", *extra]
    r = cli(*args, "--emit-recipe", "r.yaml")
    assert r.exit_code == 0, r.output
    shutil.move("out", "out-cli")
    r = cli("run", "r.yaml")
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in Path("out-cli").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "recipe.yaml"]
    assert files == sorted(p.name for p in Path("out").iterdir())
    for f in files:
        assert (work / "out" / f).read_bytes() == (work / "out-cli" / f).read_bytes(), f

    # A hand-written recipe (comments, other key order) gives the same adapter bytes.
    params = "parameters: {rank: 5}\n" if extra else ""
    Path("hand.yaml").write_text(
        f"# hand-written\nseed: 5\nmethod: {method}\n{params}output: {{path: out-hand, dtype: float32}}\n"
        "adapters:\n  - {source: examples/tiny-llama-shift, weight: 0.7}\n"
        "  - {source: examples/tiny-llama-double, weight: 0.3}\n")
    assert cli("run", "hand.yaml").exit_code == 0
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (work / "out-hand" / f).read_bytes() == (work / "out-cli" / f).read_bytes(), f


def test_emit_recipe_to_stdout(work):
    r = cli("merge", "examples/tiny-llama-shift", "--method", "linear", "-o", "o1", "--emit-recipe", "-")
    assert r.exit_code == 0, r.output
    # no weight given: the recipe leaves it out, which means 1/n (the average) as on the command line
    assert r.output.startswith("method: linear\nadapters:\n- source: examples/tiny-llama-shift\noutput:\n")


def test_cluster_emit_recipe_reproduces_the_lego_output(work):
    r = cli("cluster", "examples/tiny-llama-shift", "examples/tiny-llama-double", "-k", "6", "--reweight", "lsq",
            "--seed", "3", "-o", "out", "--emit-recipe", "r.yaml")
    assert r.exit_code == 0, r.output
    assert "method: lego" in Path("r.yaml").read_text()
    shutil.move("out", "out-cli")
    assert cli("run", "r.yaml").exit_code == 0
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml"):
        assert (work / "out" / f).read_bytes() == (work / "out-cli" / f).read_bytes(), f
