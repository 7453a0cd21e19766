"""A non-editable install must ship every subpackage: pyproject lists packages explicitly."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    on_disk = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    data_only = set(cfg.get("package-data", {})) - on_disk  # folders of data files (no __init__.py)
    assert listed - on_disk - data_only == set()
