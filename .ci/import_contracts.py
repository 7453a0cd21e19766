"""Check the import contracts of pyproject.toml's ``[tool.importlinter]`` (the floors of docs/ARCHITECTURE.md).

    python .ci/import_contracts.py        # exit 1 when a contract is broken (``make lint``, ``.ci/run``)

import-linter reads a package from its folder, but ``algorithms/``, ``cli/`` and ``evals/`` are installed as
``mergekit_lora.algorithms``, ``.cli`` and ``.evals`` (pyproject's ``package-dir``), which a folder walk of
``mergekit_lora/`` does not see. So the Python files are copied into a temporary tree laid out as the wheel
installs them, and the contracts are checked against that tree: every import of every floor is seen.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def stage(dest: Path) -> Path:
    """Copy the package's Python files into ``dest`` as installed (package-dir applied); returns ``dest``."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):
        target = dest.joinpath(*package.split("."))
        for src in (ROOT / folder).rglob("*.py"):
            rel = src.relative_to(ROOT / folder)
            if rel.parts[0] in mapping.values() or any(p.startswith(".") for p in rel.parts):
                continue
            out = target / rel
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
