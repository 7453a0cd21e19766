"""Check the import contracts of pyproject.toml's ``[tool.importlinter]`` (the floors of docs/ARCHITECTURE.md).

    python .ci/import_contracts.py        # exit 1 when a contract is broken (``make lint``, ``.ci/run``)

The package lives in one folder, ``mergekit_lora/`` (algorithms, cli and the eval harness included; benchmarks
and results stay in the top-level ``evals/``, outside the package). The Python files are copied into a temporary
tree first so that the tests can break a contract on a copy and see the check fail; the real check runs on the
same copy of the checkout.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(dest: Path) -> Path:
    """Copy the package's Python files into ``dest/mergekit_lora``; returns ``dest``."""
    for src in (ROOT / "mergekit_lora").rglob("*.py"):
        rel = src.relative_to(ROOT)
        if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    return dest


def lint_tree(tree: Path, verbose: bool = False) -> int:
    """Run import-linter on a staged tree (see :func:`stage`); returns its exit code (0: every contract kept)."""
    from importlinter.cli import lint_imports

    here = os.getcwd()
    os.chdir(tree)  # import-linter puts the working directory first on sys.path: the staged tree, not the checkout
    sys.path.insert(0, str(tree))
    saved = {k: v for k, v in sys.modules.items() if k == "mergekit_lora" or k.startswith("mergekit_lora.")}
    for k in saved:
        del sys.modules[k]
    try:
        return lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, verbose=verbose)
    finally:
        os.chdir(here)
        sys.path.remove(str(tree))
        for k in [k for k in sys.modules if k == "mergekit_lora" or k.startswith("mergekit_lora.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def check(verbose: bool = False) -> int:
    """Stage the checkout and check the contracts; returns 0 when every contract is kept."""
    with tempfile.TemporaryDirectory(prefix="import-contracts-") as tmp:
        return lint_tree(stage(Path(tmp)), verbose)


if __name__ == "__main__":
    sys.exit(check(verbose="-v" in sys.argv[1:]))
