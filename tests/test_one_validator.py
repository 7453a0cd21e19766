"""One validator per fact, one wording (issue 24): a NaN/Inf number is reported once, as not finite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError
from mergekit_lora.cli.main import app
from mergekit_lora.errors import PlanErrors, not_finite
from mergekit_lora.pipeline import MergeRequest, make_options, plan
from mergekit_lora.recipe import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
A, B = (str(ROOT / "examples" / "suite" / t) for t in ("topic", "sentiment"))
WORDING = "is not a finite number; NaN and Inf cannot be merged, give a finite value"


def _recipe(method: str, parameters: str, out: Path, weight: str = "0.5") -> str:
    return (f"method: {method}\nadapters:\n  - source: {A}\n    weight: {weight}\n  - source: {B}\n"
            f"parameters: {parameters}\noutput:\n  path: {out}\n")


def _problems(text: str) -> list[str]:
    with pytest.raises(LoraMergeError) as e:
        validate_recipe(text)
    msg = str(e.value)
    return [ln for ln in msg.splitlines() if ln.startswith("  - ")] or [msg]


@pytest.mark.parametrize(("method", "parameters", "field"), [
    ("ties", "{density: .nan, rank: 8}", "parameters.density"),
    ("lego", "{k_ratio: .nan}", "parameters.k_ratio"),
    ("ties", "{density: [0.5, .inf]}", "parameters.density"),
])
def test_recipe_nan_parameter_is_one_problem(tmp_path, method, parameters, field):
    problems = _problems(_recipe(method, parameters, tmp_path / "out"))
    assert len(problems) == 1, problems
    assert f"{field} {WORDING}" in problems[0]
    assert "less than or equal" not in problems[0]


def test_recipe_nan_weight_has_the_same_wording(tmp_path):
    problems = _problems(_recipe("linear", "{}", tmp_path / "out", weight=".nan"))
    assert len(problems) == 1 and f"adapters[0].weight {WORDING}" in problems[0], problems


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan"])
def test_plan_reports_a_nan_parameter_once(tmp_path, value):
    with pytest.raises(LoraMergeError) as e:
        plan(MergeRequest(sources=[A, B], method="ties", params={"density": value, "rank": 8},
                          options=make_options(out=tmp_path / "o")))
    assert not isinstance(e.value, PlanErrors), str(e.value)
    assert str(e.value) == not_finite("parameters.density")


@pytest.mark.parametrize("args", [["--density", "nan"], ["-p", "density=nan"], ["-p", "density=.inf"]])
def test_cli_nan_parameter_is_one_line(tmp_path, args):
    r = CliRunner().invoke(app, ["merge", A, B, "-m", "ties", "--rank", "8", *args, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert f"error: parameters.density {WORDING}" in r.output, r.output
    assert "problems" not in r.output and "less than or equal" not in r.output


def _recipe_problem(text: str) -> str:
    problems = _problems(text)
    assert len(problems) == 1, problems
    return problems[0].split("): ", 1)[1]


def test_dtype_has_one_validator_and_one_wording(tmp_path):
    from mergekit_lora.options import check_dtype
    from mergekit_lora.pipeline import resolve_dtype

    with pytest.raises(ValueError) as want:
        check_dtype("fp8")
    with pytest.raises(LoraMergeError) as opts:
        make_options(dtype="fp8")
    with pytest.raises(LoraMergeError) as resolved:
        resolve_dtype("fp8", [])
    text = _recipe("linear", "{}", tmp_path / "out").replace("output:\n", "output:\n  dtype: fp8\n")
    assert str(want.value) in str(opts.value)
    assert str(resolved.value) == str(want.value) == _recipe_problem(text)


@pytest.mark.parametrize("device", ["tpu", "cudax", "cuda:x"])
def test_device_has_one_validator_and_one_wording(tmp_path, device):
    from mergekit_lora.options import check_device
    from mergekit_lora.pipeline import resolve_device

    with pytest.raises(ValueError) as want:
        check_device(device)
    with pytest.raises(LoraMergeError) as opts:
        make_options(device=device)
    with pytest.raises(LoraMergeError) as resolved:  # was a RuntimeError from torch for "cudax"
        resolve_device(device)
    text = _recipe("linear", "{}", tmp_path / "out") + f"device: {device}\n"
    assert str(want.value) in str(opts.value)
    assert str(resolved.value) == str(want.value) == _recipe_problem(text)


def test_weight_count_has_one_wording(tmp_path):
    from mergekit_lora.evals.fidelity import fidelity_report

    want = "got 3 weights for 2 adapters; give one weight per adapter"
    with pytest.raises(LoraMergeError, match=want):
        plan(MergeRequest(sources=[A, B], method="linear", weights=[1, 1, 1], options=make_options(out=tmp_path / "o")))
    with pytest.raises(LoraMergeError, match=want):
        fidelity_report(A, [A, B], [1, 1, 1])
    text = _recipe("linear", "{}", tmp_path / "out") + "modules:\n  - match: '*'\n    weights: [1, 1, 1]\n"
    assert _recipe_problem(text) == want


def test_existing_output_has_one_wording(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    want = f"{out} already exists; choose another output or pass --force to replace it"
    merge = CliRunner().invoke(app, ["merge", A, B, "-m", "linear", "-o", str(out)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe("linear", "{}", out))
    run = CliRunner().invoke(app, ["run", str(recipe)])
    assert merge.exit_code == run.exit_code == 2
    assert want in " ".join(merge.output.split()), merge.output
    assert want in " ".join(run.output.split()), run.output


def test_changed_options_are_validated():
    """The core changes options with make_options (validated), never model_copy(update=...) (not validated)."""
    opts = make_options(seed=1)
    with pytest.raises(LoraMergeError, match="unknown device 'tpu'"):
        make_options(opts, device="tpu")
    for path in sorted((ROOT / "mergekit_lora").rglob("*.py")):
        code = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        assert not any("model_copy(update" in ln.split("#")[0] for ln in code), path


# ------------------------------------------------------------------------------------- one request model
def test_plan_takes_one_request():
    import inspect

    assert list(inspect.signature(plan).parameters) == ["request"]


def test_recipe_and_tune_declare_no_option_of_their_own():
    """The recipe's run options are MergeOptions' fields (same default, same description), mapped once
    (OPTION_KEYS); tune's settings hold the request and declare no option or request field again."""
    import dataclasses

    from mergekit_lora.options import MergeOptions
    from mergekit_lora.recipe import Recipe
    from mergekit_lora.recipe.schema import OPTION_KEYS, OutputSpec
    from mergekit_lora.request import MergeRequest
    from mergekit_lora.tune.search import TuneSettings

    models = {(): Recipe, ("output",): OutputSpec}
    for name, loc in OPTION_KEYS.items():
        got = models[loc[:-1]].model_fields[loc[-1]]
        want = MergeOptions.model_fields[name]
        assert got.description == want.description, name
        assert name == "out" or got.default == want.default, name
    own = set(Recipe.model_fields) - {loc[0] for loc in OPTION_KEYS.values()}
    assert own == {"method", "base_model", "adapters", "parameters", "modules"}  # the request's own fields
    assert set(OutputSpec.model_fields) == {loc[1] for loc in OPTION_KEYS.values() if len(loc) == 2}
    tune = {f.name for f in dataclasses.fields(TuneSettings)} - {"out"}  # out: the search's folder, not the adapter's
    assert not tune & (set(MergeOptions.model_fields) | set(MergeRequest.model_fields)), tune


@pytest.mark.parametrize(("line", "where", "wording"), [
    ("seed: -1\n", "seed", "greater than or equal to 0"),
    ("missing: sometimes\n", "missing", "must be union, intersection or error (got 'sometimes')"),
    ("scale: loud\n", "scale", "scale"),
])
def test_recipe_option_mistake_is_one_problem(tmp_path, line, where, wording):
    """A run option in a recipe is checked by MergeOptions alone: one problem, at its line."""
    problems = _problems(_recipe("linear", "{}", tmp_path / "out") + line)
    assert len(problems) == 1, problems
    assert f": {where} (line" in problems[0] and wording in problems[0], problems


def test_recipe_request_is_what_plan_takes(tmp_path):
    """A recipe and the equivalent Python request give the same recipe YAML (one serialisation)."""
    from mergekit_lora.recipe import recipe_yaml

    text = _recipe("ties", "{density: 0.5}", tmp_path / "out") + "seed: 3\nmissing: intersection\n"
    recipe, _ = validate_recipe(text)
    req = recipe.request(text)
    assert req.options.seed == 3 and req.options.missing == "intersection" and req.recipe == text
    same = MergeRequest(sources=[A, B], method="ties", params={"density": 0.5}, weights=[0.5, 0.5],
                        options=make_options(out=tmp_path / "out", seed=3, missing="intersection"))
    assert recipe_yaml(req) == recipe_yaml(same)
    assert validate_recipe(recipe_yaml(same))[0].request().options == same.options


# --------------------------------------------------------------------------- flags generated from Params
@pytest.mark.parametrize(("command", "params"), [("cluster", "LegoParams"), ("route", "RouteParams")])
def test_every_params_field_has_a_flag(command, params):
    import typer

    import mergekit_lora.algorithms.params as P
    from mergekit_lora.algorithms.lego.params import LegoParams
    from mergekit_lora.cli.options import flag

    model = LegoParams if params == "LegoParams" else getattr(P, params)
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    opts = {o for p in cmd.params for o in p.opts}
    missing = [f for f in model.model_fields if flag(f) not in opts and "--" + f.replace("_", "-") not in opts]
    assert not missing, missing
    by_name = {p.name: p for p in cmd.params}
    for f, info in model.model_fields.items():
        assert by_name[f].help.startswith(info.description), f  # the help is the field's description
        assert by_name[f].default is None, f  # unset: the method's own default applies


def test_generated_params_flags_reach_the_plan(tmp_path):
    """A generated flag is passed only when given, checked by the method's Params (one error line)."""
    r = CliRunner().invoke(app, ["cluster", A, B, "--k-ratio", "nan", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and f"parameters.k_ratio {WORDING}" in r.output, r.output
    r = CliRunner().invoke(app, ["cluster", A, B, "-k", "2", "--n-init", "0", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "n_init" in r.output and "greater than or equal to 1" in r.output, r.output
    assert not (tmp_path / "o").exists()
