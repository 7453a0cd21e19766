"""The import contracts of pyproject.toml (the floors of docs/ARCHITECTURE.md) hold, and the check can fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def _tool():
    spec = importlib.util.spec_from_file_location("import_contracts", ROOT / ".ci" / "import_contracts.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_import_contracts_are_kept(capsys):
    assert _tool().check() == 0, capsys.readouterr().out


def test_staged_tree_holds_the_whole_package(tmp_path):
    tree = _tool().stage(tmp_path)
    for name in ("cli/main.py", "algorithms/catalog.py", "evals/tasks.py", "pipeline/plan.py"):
        assert (tree / "mergekit_lora" / name).is_file(), name


@pytest.mark.parametrize(("module", "line"), [
    ("formats/registry.py", "from mergekit_lora.routing import api"),           # formats above routing
    ("distributed/actors.py", "from mergekit_lora.tune import evaluator"),       # Ray actors above the search
    ("pipeline/plan.py", "from mergekit_lora.evals import tasks"),               # core above the harness
    ("algorithms/linear.py", "from mergekit_lora.pipeline import plan"),         # a plugin calling the pipeline
    ("algorithms/params.py", "import torch"),                                    # the method table with torch
    ("formats/tensors.py", "from mergekit_lora.formats import load"),            # a circle inside one floor
    ("recipe/problems.py", "from mergekit_lora.recipe import schema"),           # a circle inside one package
])
def test_an_upward_import_breaks_a_contract(tmp_path, capsys, module, line):
    tool = _tool()
    tree = tool.stage(tmp_path)
    path = tree / "mergekit_lora" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    assert tool.lint_tree(tree) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_the_pipeline_names_no_format():
    """Format facts live in their FormatSpec (options, check_options, library, refuse_inputs, align)."""
    from mergekit_lora.formats.registry import builtin_formats

    names = [s.name for s in builtin_formats()]
    for path in sorted((ROOT / "mergekit_lora" / "pipeline").glob("*.py")):
        text = path.read_text()
        for name in names:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (path.name, name)
