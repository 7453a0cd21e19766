"""Issue 23, first contact: the headline command as written, bare files that state their alpha, one
`error:` line for every user error (click's too) before torch is imported, and the smaller fixes.

Commands run as a user runs them: a fresh interpreter per command (exit code, stdout, stderr), in a
temporary current folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergekit_lora import load_adapter

ROOT = Path(__file__).resolve().parents[1]
SHIFT, DOUBLE, BASE = ROOT / "examples/tiny-llama-shift", ROOT / "examples/tiny-llama-double", ROOT / "examples/tiny-llama"

# Runs the CLI and reports on stderr, at exit, whether torch was ever imported.
_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("TORCH=%s\\n" % ("torch" in sys.modules)))
from mergekit_lora.cli.main import main
sys.argv = ["loramerge", *sys.argv[1:]]
main()
"""


def cli(*args, cwd: Path | None = None, probe: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _PROBE] if probe else [sys.executable, "-m", "mergekit_lora.cli.main"]
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def errors(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if not ln.startswith("TORCH=")]


def bare(tmp: Path, name: str, src: Path = SHIFT) -> Path:
    """The adapter's weights alone (no adapter_config.json), as a user downloads a LoRA file."""
    out = tmp / f"{name}.safetensors"
    shutil.copy(src / "adapter_model.safetensors", out)
    return out


def delta(path: Path, module: str) -> torch.Tensor:
    return load_adapter(path).units(module).delta()


MODULE = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------- the headline, as written
def test_headline_cluster_without_out_writes_a_fresh_folder_and_says_concatenation(tmp_path):
    bare(tmp_path, "a"), bare(tmp_path, "b", DOUBLE)
    r = cli("cluster", "a.safetensors", "b.safetensors", "-k", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "writing to ./lego-a-b/" in r.stdout
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert any("concatenation" in w and "k = 16" in w for w in warns), r.stderr
    assert any("alpha is assumed = r" in w and "a.safetensors:alpha=" in w for w in warns), r.stderr
    merged = load_adapter(tmp_path / "lego-a-b")  # a usable adapter
    assert merged.units(MODULE).rank > 0
    card = (tmp_path / "lego-a-b" / "README.md").read_text()
    assert "## Input notes" in card and "alpha is assumed = r" in card
    assert "pypi.org" not in card  # no link to a package page that does not exist
    r2 = cli("cluster", "a.safetensors", "b.safetensors", "-k", "16", cwd=tmp_path)  # never over an existing path
    assert r2.returncode == 0 and "writing to ./lego-a-b-2/" in r2.stdout, r2.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["lego-a-b", "lego-a-b-2"]


def test_merge_without_out_names_method_and_inputs_and_force_reuses_it(tmp_path):
    r = cli("merge", SHIFT, DOUBLE, "-m", "ties", "--density", "0.5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ties-tiny-llama-shift-tiny-llama-double" / "adapter_model.safetensors").is_file()
    r = cli("merge", SHIFT, DOUBLE, "-m", "ties", "--density", "0.5", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ties-tiny-llama-shift-tiny-llama-double"]


def test_alpha_suffix_states_the_strength_of_a_bare_file(tmp_path):
    a = bare(tmp_path, "a")
    r = cli("merge", f"{a}:alpha=8", "-o", tmp_path / "stated", "--emit-recipe", tmp_path / "r.yaml",
            cwd=tmp_path)  # r = 4 in this file: scale 2
    assert r.returncode == 0, r.stderr
    assert "alpha is assumed" not in r.stderr
    written = (tmp_path / "stated" / "adapter_model.safetensors").read_bytes()
    r = cli("run", tmp_path / "r.yaml", "--force", cwd=tmp_path)  # the suffix is part of the recipe's source
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "stated" / "adapter_model.safetensors").read_bytes() == written
    r = cli("merge", a, "-o", tmp_path / "assumed", cwd=tmp_path)
    assert r.returncode == 0 and "alpha is assumed = r" in r.stderr
    stated, assumed = delta(tmp_path / "stated", MODULE), delta(tmp_path / "assumed", MODULE)
    original = delta(SHIFT, MODULE)  # the folder with its adapter_config.json (lora_alpha 8)
    assert torch.allclose(stated, original, rtol=1e-3, atol=1e-6)
    assert torch.allclose(assumed * 2, original, rtol=1e-3, atol=1e-6)  # alpha = r silently halved it before


@pytest.mark.parametrize("source,message", [
    (f"{SHIFT}:alpha=16", "this adapter's alpha comes from its adapter_config.json"),
    ("a.safetensors:alpha=-1", "alpha must be a positive number"),
])
def test_alpha_suffix_refused_where_it_does_not_apply(tmp_path, source, message):
    bare(tmp_path, "a")
    r = cli("merge", source, "-o", tmp_path / "o", cwd=tmp_path)
    assert r.returncode == 2 and len(errors(r)) == 1 and errors(r)[0].startswith("error: ")
    assert message in r.stderr and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- one error line, before torch
@pytest.mark.parametrize("args,message", [
    (["merge", SHIFT, DOUBLE, "--bogus"], "No such option: --bogus"),
    (["cluster", SHIFT, DOUBLE, "-k", "abc"], "Invalid value for '-k'"),
    (["route", SHIFT, DOUBLE, "--top-k", "two", "-o", "x"], "Invalid value for '--top-k'"),
    (["merge", SHIFT, "-o"], "requires an argument"),
])
def test_click_errors_are_one_error_line_exit_2(tmp_path, args, message):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert errors(r) == [errors(r)[0]] and errors(r)[0].startswith("error: ") and message in r.stderr
    assert "Usage:" not in r.stderr and "╭" not in r.stderr


@pytest.mark.parametrize("args,message", [
    (["merge", SHIFT, DOUBLE, "-m", "tiess", "-o", "o"], "unknown method 'tiess' (did you mean 'ties'?)"),
    (["merge", SHIFT, str(DOUBLE) + "x", "-o", "o"], f"no such file or folder (did you mean {DOUBLE}?)"),
    (["merge", SHIFT, DOUBLE, "-m", "ties", "--density", "2", "-o", "o"], "density: Input should be less than"),
    (["merge", SHIFT, DOUBLE, "--weights", "1,2,3", "-o", "o"], "got 3 weights for 2 adapters"),
    (["merge", SHIFT, DOUBLE, "-o", "exists"], "exists already exists; choose another output or pass --force"),
    (["cluster", SHIFT, DOUBLE, "--weights", "1,1", "-m", "x"], "No such option: -m"),
    (["route", SHIFT, DOUBLE, "--top-k", "4", "-o", "exists"], "exists already exists"),
    (["run", "bad.yaml"], "method (line 1): unknown method 'tiess' (did you mean 'ties'?)"),
    (["inspect", str(SHIFT) + "x"], f"no such file or folder (did you mean {SHIFT}?)"),
    (["eval", "fidelity", "nothere", "--against", SHIFT], "nothere: no such file or folder"),
])
def test_plan_stage_errors_come_before_torch_and_fast(tmp_path, args, message):
    (tmp_path / "exists").mkdir()
    (tmp_path / "bad.yaml").write_text(f"method: tiess\nadapters:\n  - source: {SHIFT}\noutput: {{path: o}}\n")
    t0 = time.perf_counter()
    r = cli(*args, cwd=tmp_path, probe=True)
    wall = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr
    assert len(errors(r)) == 1 and errors(r)[0].startswith("error: ") and message in r.stderr, r.stderr
    assert "TORCH=False" in r.stderr  # validation never waits for torch (3-4.5 s before)
    assert wall < 3.0  # ~0.25 s on an idle core; generous for a shared CI machine


def test_inspect_of_a_peft_file_needs_no_torch(tmp_path):
    r = cli("inspect", SHIFT / "adapter_model.safetensors", "--json", cwd=tmp_path, probe=True)
    assert r.returncode == 0, r.stderr
    assert "TORCH=False" in r.stderr and json.loads(r.stdout)["format"] == "peft"


def test_gguf_input_is_named_as_such(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    for cmd in (["inspect", "model.gguf"], ["merge", "model.gguf", SHIFT, "-o", "o"]):
        r = cli(*cmd, cwd=tmp_path)
        assert r.returncode == 2 and len(errors(r)) == 1, r.stderr
        assert "model.gguf is a GGUF file" in r.stderr and "header too large" not in r.stderr


def test_q_k_permute_error_says_the_base_does_not_fit():
    from mergekit_lora.errors import LoraMergeError
    from mergekit_lora.formats.gguf import _permute_rows

    with pytest.raises(LoraMergeError, match="not trained on this base model") as e:
        _permute_rows(torch.zeros(32, 4), 3, "model.layers.0.self_attn.q_proj")
    assert "cannot permute" not in str(e.value)


# ---------------------------------------------------------------- the list
def test_lambda_round_trips_through_the_emitted_recipe(tmp_path):
    for spelling in (["-p", "lambda=1.5"], ["--lambda", "1.5"]):
        out, recipe = tmp_path / "o", tmp_path / "r.yaml"
        r = cli("merge", SHIFT, DOUBLE, "-m", "ties", "--density", "0.5", *spelling, "-o", out, "--force",
                "--emit-recipe", recipe, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "lambda: 1.5" in recipe.read_text()
        first = (out / "adapter_model.safetensors").read_bytes()
        r = cli("run", recipe, "--force", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert (out / "adapter_model.safetensors").read_bytes() == first


def test_export_of_a_routed_adapter_refuses_without_a_static_choice(tmp_path):
    r = cli("route", SHIFT, DOUBLE, "--top-k", "4", "-o", tmp_path / "routed", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("export", tmp_path / "routed", "-o", tmp_path / "r.gguf", "--architecture", "llama", cwd=tmp_path)
    assert r.returncode == 2 and len(errors(r)) == 1, r.stderr
    assert "is a routed adapter" in r.stderr and "--static cat" in r.stderr
    r = cli("export", tmp_path / "routed", "-o", tmp_path / "r.gguf", "--static", "svd", cwd=tmp_path)
    assert r.returncode == 2 and "the one static form of a routed adapter is 'cat'" in r.stderr
    assert not (tmp_path / "r.gguf").exists()


def test_methods_keeps_brackets_and_threads_is_a_real_flag(tmp_path):
    r = cli("methods", cwd=tmp_path)
    assert r.returncode == 0 and "[a/‖a‖; b/‖b‖]" in r.stdout, r.stdout
    for cmd in ("merge", "cluster", "route"):
        assert "--threads" in cli(cmd, "--help", cwd=tmp_path).stdout
    r = cli("merge", SHIFT, DOUBLE, "--threads", "1", "-o", tmp_path / "t1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("merge", SHIFT, DOUBLE, "--threads", "0", "-o", tmp_path / "t0", cwd=tmp_path)
    assert r.returncode == 2 and errors(r)[0].startswith("error: ") and "--threads" in r.stderr


def test_compare_console_table_fits_80_columns_and_ends_with_a_verdict():
    from rich.console import Console

    import mergekit_lora.cli.eval_cmd as eval_cmd
    from mergekit_lora.evals.report_text import verdict

    report = json.loads((ROOT / "evals/results/v2-a.json").read_text())
    saved = eval_cmd.console
    eval_cmd.console = Console(width=80, record=True)
    try:
        eval_cmd._print_report(report, Path("out/v2-a"))
        lines = eval_cmd.console.export_text().splitlines()
    finally:
        eval_cmd.console = saved
    assert max(len(ln) for ln in lines[:-1]) <= 80
    assert lines[-1] == verdict(report)
    assert lines[-1] == ("verdict: lego is the best merge (norm. acc 0.789): Δ +0.010 [-0.001, +0.020] vs linear, "
                         "paired 95% CI includes 0")


def test_lego_picture_shows_every_layer():
    from mergekit_lora.algorithms.lego.report import ModuleRecord
    from mergekit_lora.algorithms.lego.report_plot import layer_grid, report_png

    recs = [ModuleRecord(f"model.layers.{i}.self_attn.q_proj", 8, 4, False, 1.0, {}, sizes=[3, 1, 4, 0],
                         input_by_cluster={0: [1, 1, 2, 0], 1: [2, 0, 2, 0]}, cos_mean=[0.9] * 4,
                         cos_min=[0.8] * 4) for i in (2, 0, 1)]
    grid, inputs, bounds = layer_grid(recs)
    assert inputs == [0, 1] and bounds == [0, 4, 8, 12] and len(grid[0]) == 12  # three layers, 4 clusters each
    assert grid[0][:4] == [2, 1, 1, 0]  # largest cluster first
    assert report_png(recs, ["a", "b"])[:4] == b"\x89PNG"
