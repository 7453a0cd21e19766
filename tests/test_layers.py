"""The import contracts of pyproject.toml (the floors of docs/ARCHITECTURE.md) hold, and the check can fail."""

from __future__ import annotations

import importlib.util
import re
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
    ("formats/gguf.py", "from mergekit_lora.atomic import atomic_file"),         # a second output writer
    ("evals/compare.py", "from mergekit_lora.atomic import atomic_output"),      # a report folder of its own
])
def test_an_upward_import_breaks_a_contract(tmp_path, capsys, module, line):
    tool = _tool()
    tree = tool.stage(tmp_path)
    path = tree / "mergekit_lora" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    assert tool.lint_tree(tree) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_the_pipeline_names_no_format():
    """Format facts live in their FormatSpec (options, check_options, library, refuse_inputs, refuse_mix, align)."""
    from mergekit_lora.formats.registry import builtin_formats

    names = [s.name for s in builtin_formats()]
    for path in sorted((ROOT / "mergekit_lora" / "pipeline").glob("*.py")):
        text = path.read_text()
        for name in names:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (path.name, name)
        for family in ("sd", "sd_detect", "sd_common", "kohya", "diffusers", "gguf", "routed", "peft_read"):
            assert f"formats.{family} import" not in text and f"formats import {family}" not in text, (path.name, family)


# Something renamed into place outside atomic.py: each is not an output of a command (what it is instead).
NOT_OUTPUTS = {
    "tune/trials.py": "trials.jsonl, the search's running log, rewritten after each trial",
    "library/store.py": "the library's faiss index, rebuilt beside its catalogue",
    "formats/safetensors_stream.py": "a file inside the writer's temp folder",
    "evals/score_cache.py": "one entry of the score cache",
    "evals/suite/model.py": "the suite's base model, converted once into the cache",
}
_WRITES = re.compile(r"os\.replace\(|\.rename\(|mkstemp\(|mkdtemp\(|\btmp\w*\.replace\(|atomic_output\(|atomic_file\(")


def test_no_module_but_the_pipeline_writes_an_output():
    """No second atomic writer (export had one): outside atomic.py and pipeline/output.py, nothing renames a
    file or folder into place or opens an atomic output, except the listed non-outputs — and each of those
    still does (the list does not outlive its reasons)."""
    pkg = ROOT / "mergekit_lora"
    found = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py")
             if p.relative_to(pkg).as_posix() not in ("atomic.py", "pipeline/output.py")
             and _WRITES.search(p.read_text())}
    assert found == set(NOT_OUTPUTS)
