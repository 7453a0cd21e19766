"""docs/ARCHITECTURE.md's "where things go", made true: a new format and a new algorithm come from files outside
the package (installed through their entry points, as a plugin would be) and run through plan/execute and
export; a new command is one file plus its line in cli/main.py."""

from __future__ import annotations

import ast
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import make_peft_adapter

import mergekit_lora.formats.registry as fmt_registry
import mergekit_lora.registry as algo_registry
from mergekit_lora import export, load_adapter, merge
from mergekit_lora.cli.main import app

ROOT = Path(__file__).resolve().parents[1]

# File 1 of a format: its writer (and reader, sniffing, ... when it has them) and its FormatSpec.
TOY_FORMAT = '''
import json
from dataclasses import dataclass
from mergekit_lora.formats.registry import FormatSpec


@dataclass(frozen=True)
class ToyOptions:
    note: str


def write_toy(req):
    rows = {name: [u.rank, u.d_out, u.d_in, float(u.delta().double().norm())] for name, u in req.modules}
    doc = {"method": req.method, "dtype": str(req.dtype), "note": req.options.note, "modules": rows}
    (req.out_dir / "toy.json").write_text(json.dumps(doc, sort_keys=True))
    return {"modules": len(rows)}


SPEC = FormatSpec("toy", write=write_toy, write_options=lambda opts: ToyOptions(f"seed {opts.seed}"),
                  file="toy.json", library="toy")
'''

# File 1 of an algorithm plugin: its Params and its class (a built-in splits these over params.py, catalog.py
# and its own file: three files).
TOY_ALGORITHM = '''
from pydantic import Field
from mergekit_lora.registry import Algorithm, AlgorithmParams, MergedModule

SEEN = []


class FirstParams(AlgorithmParams):
    factor: float = Field(1.0, gt=0, description="scale of the first input's update")


class First(Algorithm[FirstParams]):
    name = "toy_first"
    description = "the first input's update, scaled (a test plugin)"
    Params = FirstParams

    def merge_module(self, units, weights, params, ctx):
        SEEN.append(ctx.threads.budget)  # the run's thread budget comes in the context
        u = units[0]
        return MergedModule(u.with_factors(u.A, u.B * params.factor))
'''


def _install(site: Path, name: str, module: str, source: str, group: str, target: str) -> None:
    """File 1: the plugin's module; file 2: its entry point (what pip writes from the plugin's pyproject.toml)."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{module} = {target}\n")


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "toy_format", "toy_format_plugin", TOY_FORMAT, fmt_registry.ENTRY_POINT_GROUP,
             "toy_format_plugin:SPEC")
    _install(site, "toy_algorithm", "toy_algorithm_plugin", TOY_ALGORITHM, algo_registry.ENTRY_POINT_GROUP,
             "toy_algorithm_plugin:First")
    monkeypatch.syspath_prepend(str(site))
    fmt_registry._installed.cache_clear()
    algo_registry._entry_point_entries.cache_clear()
    yield site
    fmt_registry._installed.cache_clear()
    algo_registry._entry_point_entries.cache_clear()
    for m in ("toy_format_plugin", "toy_algorithm_plugin"):
        sys.modules.pop(m, None)


def test_a_new_format_and_a_new_algorithm_are_two_files_each(plugins, tmp_path):
    a = make_peft_adapter(tmp_path / "a", "llama", seed=1)
    b = make_peft_adapter(tmp_path / "b", "llama", seed=2)
    res = merge([a, b], "toy_first", tmp_path / "out", params={"factor": 2.0}, output_format="toy", seed=5,
                threads=3)
    doc = json.loads((tmp_path / "out" / "toy.json").read_text())
    assert doc["method"] == "toy_first" and doc["note"] == "seed 5"  # its options from the run options
    src = load_adapter(a)
    for name, (rank, d_out, d_in, norm) in doc["modules"].items():
        want = float((2.0 * src.units(name).delta()).double().norm())
        assert (rank, d_out, d_in) == (src.modules[name].rank, src.modules[name].d_out, src.modules[name].d_in)
        assert norm == pytest.approx(want, rel=1e-6)
    assert res.modules == len(doc["modules"]) > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: toy" in card and "toy_first" in card  # the pipeline's card, whatever the format
    assert set(sys.modules["toy_algorithm_plugin"].SEEN) == {3}  # threads=3 reached every module's context
    # the same format as a one-file export (FormatSpec.file), through the pipeline's one writer
    info = export(a, tmp_path / "a.json", "toy", sys.modules["toy_format_plugin"].ToyOptions("x"),
                  dtype=torch.float32)
    assert info["file"] == str(tmp_path / "a.json") and json.loads((tmp_path / "a.json").read_text())["note"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.json", "b", "out", "site"]  # no temp left


def test_an_unknown_output_format_is_refused_by_name(tmp_path):
    a = make_peft_adapter(tmp_path / "a", "llama", seed=1)
    from mergekit_lora.errors import LoraMergeError

    with pytest.raises(LoraMergeError, match="unknown output format 'toy'"):
        merge([a], "linear", tmp_path / "out", output_format="toy")
    with pytest.raises(LoraMergeError, match="is a folder, not one file"):
        export(a, tmp_path / "x", "peft")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_a_new_command_is_its_file_and_one_line_in_main():
    """Every command's function lives in its own ``cli/*_cmd.py`` file, and ``cli/main.py`` is the one place
    that registers commands."""
    for cmd in app.registered_commands:
        module = cmd.callback.__module__
        assert module.startswith("mergekit_lora.cli.") and module.endswith("_cmd"), (cmd.callback, module)
    for group in app.registered_groups:
        assert group.typer_instance.registered_commands or group.typer_instance.registered_groups
    registering = set()
    for path in sorted((ROOT / "mergekit_lora").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("command", "add_typer")
                    and isinstance(node.value, ast.Name) and node.value.id == "app"):
                registering.add(path.relative_to(ROOT).as_posix())
    assert registering == {"mergekit_lora/cli/main.py"}
