"""The README and docs/ as a newcomer meets them (issue 23): short, every shell example runs as written, no
link leaves the repository, and the site builds with ``mkdocs build --strict``.

A fenced ``bash`` block is preceded by one tag line:

- ``<!-- run -->``: run by this test, in a temporary folder holding a copy of ``examples/`` (and
  ``evals/results``), with the venv's ``loramerge`` and ``python`` first on PATH; the blocks of one page
  run in order in one folder, so a later block may use an earlier block's output;
- ``<!-- run slow -->``: the same, only with ``LORAMERGE_DOCS_SLOW=1``;
- ``<!-- not run: REASON -->``: never run (needs the network, a model, minutes, or changes the shell).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```bash\n(.*?)^```", re.M | re.S)
_TAG = re.compile(r"<!-- (run|run slow|not run: .+) -->")


def blocks(page: Path) -> list[tuple[str | None, str]]:
    """(tag or None, code) of every fenced bash block of the page, in order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(page.read_text())]


def test_readme_reads_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_shell_example_is_run_or_says_why_not(page):
    for tag, code in blocks(page):
        assert tag is not None and _TAG.fullmatch(tag), f"{page.name}: untagged bash block:\n{code}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_link_leaves_the_repository(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert not re.match(r"[a-z]+:", target), f"{page.name}: external link {target}"
        path = target.split("#")[0]
        if path:
            resolved = (page.parent / path).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{page.name}: broken link {target}"
    assert "../shared" not in text


def _runnable() -> list[tuple[Path, bool]]:
    out = []
    for page in PAGES:
        tags = [tag for tag, _ in blocks(page) if tag in ("<!-- run -->", "<!-- run slow -->")]
        if tags:
            out.append((page, "<!-- run slow -->" in tags))
    return out


@pytest.mark.parametrize("page,slow", _runnable(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_shell_examples_run_as_written(page, slow, tmp_path):
    run_slow = os.environ.get("LORAMERGE_DOCS_SLOW") == "1"
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("*.py"))
    shutil.copytree(ROOT / "evals" / "results", tmp_path / "evals" / "results")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    ran = 0
    for tag, code in blocks(page):
        if tag == "<!-- run -->" or (tag == "<!-- run slow -->" and run_slow):
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, f"{page.name}:\n{code}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-2000:]}"
            assert "Traceback" not in r.stderr, r.stderr
            ran += 1
    if not ran:
        pytest.skip("only slow blocks on this page (LORAMERGE_DOCS_SLOW=1 runs them)")


def test_readme_first_merge_writes_what_it_says(tmp_path):
    """The three commands' outputs are where the README says, and the k ≥ pooled rank line is there."""
    shutil.copytree(ROOT / "examples" / "suite" / "topic", tmp_path / "examples" / "suite" / "topic")
    shutil.copytree(ROOT / "examples" / "suite" / "genre", tmp_path / "examples" / "suite" / "genre")
    code = blocks(ROOT / "README.md")[1][1]
    assert code.count("loramerge ") == 3
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for folder in ("ties-topic-genre", "lego-topic-genre"):
        assert (tmp_path / folder / "adapter_model.safetensors").is_file()
        assert (tmp_path / folder / "README.md").is_file()
    assert r.stderr.strip().splitlines()[-1].startswith("warning: k = 16 ≥ the pooled rank (16)")
    assert "concatenation" in r.stderr
    assert "alpha is assumed" not in r.stderr  # a bare file with adapter_config.json beside it uses the config


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")]
    r = subprocess.run(mkdocs, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_install_changes_nothing_else_and_says_how_to_run_loramerge():
    """`make demo` never touches the system, and ends with the activation line and the README's next command."""
    makefile = (ROOT / "Makefile").read_text()
    assert "apt-get" not in makefile and "sudo" not in makefile
    demo = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "source $(VENV)/bin/activate" in demo
    readme = (ROOT / "README.md").read_text()
    shown = [ln.split("@echo", 1)[1].strip().strip('"').strip() for ln in demo.splitlines() if "loramerge merge" in ln
             and "@echo" in ln]
    assert shown and shown[0] in readme  # the command it suggests is the README's, word for word
    assert "pypi.org" not in (ROOT / "mergekit_lora" / "card.py").read_text()  # no page that does not exist
    assert "make docs" in (ROOT / ".ci" / "run").read_text() and ".ci/wheel_check" in (ROOT / ".ci" / "run").read_text()
