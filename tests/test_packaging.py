"""A non-editable install must ship every subpackage and the suite's data files."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_code_folder_is_a_package_found_by_setuptools():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["packages"]["find"]["include"] == ["mergekit_lora*"]
    missing = [
        str(d.relative_to(ROOT))
        for d in (ROOT / "mergekit_lora").rglob("*")
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").is_file()
    ]
    assert missing == [], "these folders hold code but no __init__.py: setuptools' find would skip them"


def test_suite_data_is_package_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = cfg["package-data"]["mergekit_lora.evals.suite"]
    data = ROOT / "mergekit_lora" / "evals" / "suite" / "data"
    shipped = {f.name for p in patterns for f in data.parent.glob(p)}
    assert "vader_snippets.tsv" in shipped
