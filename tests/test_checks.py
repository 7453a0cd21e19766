"""Unit tests of mergekit_lora.checks: the pure plan-time / write-time checks."""

from __future__ import annotations

import os

import pytest
import torch

from mergekit_lora import LoraMergeError
from mergekit_lora.checks import (
    check_finite,
    check_unchanged,
    fingerprint,
    finite_numbers,
    finite_units,
    output_not_input,
    output_path_ok,
)
from mergekit_lora.units import RankUnits

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("name,values,where", [
    ("weights", [NAN, 1.0], "weights[0]"),
    ("weights", [1.0, -INF], "weights[1]"),
    ("weights", [[1.0, 0.5], [1.0, INF]], "weights[1][1]"),  # a layer gradient
    ("parameters", {"density": NAN}, "parameters.density"),
    ("parameters", {"lambda": 1.0, "inner": {"x": [1, INF]}}, "parameters.inner.x[1]"),
    ("parameters", torch.tensor([1.0, NAN]), "parameters"),
])
def test_finite_numbers_names_the_entry(name, values, where):
    with pytest.raises(LoraMergeError, match=rf"^{__import__('re').escape(where)} is not a finite number"):
        finite_numbers(name, values)


@pytest.mark.parametrize("values", [[1.0, 0.5], {"density": 0.3, "method": "x", "flag": True, "none": None},
                                    [[1, 2], 3], 7, torch.ones(3), []])
def test_finite_numbers_passes_finite_values(values):
    finite_numbers("x", values)


def test_finite_numbers_reads_pydantic_models():
    from pydantic import BaseModel

    class P(BaseModel):
        density: float

    finite_numbers("parameters", P(density=0.5))
    with pytest.raises(LoraMergeError, match="parameters.density"):
        finite_numbers("parameters", P(density=NAN))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a" / "w.safetensors").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"y")
    (tmp_path / "link").symlink_to(tmp_path / "in" / "a")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("out,why", [
    ("in/a", "is the input"),
    ("link", "is the input"),  # a symlink to the input
    ("in/a/sub", "is inside the input"),
    ("link/sub", "is inside the input"),
    ("in", "contains the input"),
    ("b.safetensors", "is the input"),
    (".", "current folder"),
    ("", "current folder"),
    ("./", "current folder"),
])
def test_output_not_input_refuses(tree, out, why):
    with pytest.raises(LoraMergeError, match=why):
        output_not_input(out, ["in/a", "b.safetensors", "org/hub-id"])


def test_output_not_input_refuses_the_cwd_by_absolute_path_and_a_parent(tree):
    with pytest.raises(LoraMergeError, match="current folder"):
        output_not_input(str(tree), ["in/a"])
    with pytest.raises(LoraMergeError, match="contains the input"):
        output_not_input(str(tree.parent / tree.name / "in"), [str(tree / "in" / "a" / "w.safetensors")])


def test_output_not_input_accepts_siblings_and_hub_ids(tree):
    output_not_input("merged", ["in/a", "b.safetensors", "org/name"])
    output_not_input("in/ab", ["in/a"])  # a prefix of the name is not containment


def test_output_path_ok(tmp_path):
    output_path_ok(tmp_path / "new" / "deeper" / "out")  # parents that do not exist yet are fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraMergeError, match=r"file is a file, not a folder"):
        output_path_ok(tmp_path / "file" / "out")
    with pytest.raises(LoraMergeError, match="longer than the 255 this filesystem allows"):
        output_path_ok(tmp_path / ("x" * 300))
    with pytest.raises(LoraMergeError, match="too long for its temp folder"):
        output_path_ok(tmp_path / ("x" * 250))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_output_path_ok_read_only_parent(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(LoraMergeError, match="is not writable"):
            output_path_ok(ro / "out")
    finally:
        ro.chmod(0o755)


def test_output_path_ok_read_only_parent_by_access(tmp_path, monkeypatch):
    """Where the tests run as root, os.access is the check: stub it to say 'not writable'."""
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(LoraMergeError, match=f"the folder {tmp_path} is not writable"):
        output_path_ok(tmp_path / "out")


def test_fingerprint_and_check_unchanged(tmp_path):
    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / "w.safetensors"
    f.write_bytes(b"0123456789")
    g = tmp_path / "b.bin"
    g.write_bytes(b"abc")
    fps = fingerprint([tmp_path / "a", g, tmp_path / "missing"])
    assert set(fps) == {str(f), str(g)}
    check_unchanged(fps)
    st = f.stat()
    f.write_bytes(b"0000000000")  # same size, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(LoraMergeError, match="w.safetensors: the input changed during the merge"):
        check_unchanged(fps, f)
    check_unchanged(fps, g)  # only the named file
    g.unlink()
    with pytest.raises(LoraMergeError, match="b.bin: the input disappeared"):
        check_unchanged(fps, g)


def test_check_finite():
    check_finite("x", torch.ones(3))
    check_finite("ints", torch.ones(3, dtype=torch.int64))
    with pytest.raises(LoraMergeError, match="the merged tensor m.lora_B has 2 NaN or Inf entries of 4"):
        check_finite("m.lora_B", torch.tensor([1.0, NAN, INF, 0.0]))


def test_finite_units_refuses_nan_and_float16_overflow():
    ok = RankUnits.from_factors(torch.ones(2, 3), torch.ones(4, 2))
    assert [n for n, _ in finite_units([("m", ok)], torch.float16)] == ["m"]
    bad = RankUnits.from_factors(torch.ones(2, 3), torch.full((4, 2), NAN))
    with pytest.raises(LoraMergeError, match=r"m \(B\) has 8 NaN or Inf"):
        list(finite_units([("ok", ok), ("m", bad)]))
    big = RankUnits.from_factors(torch.ones(2, 3), torch.full((4, 2), 1e6))
    with pytest.raises(LoraMergeError, match="beyond the torch.float16 range"):
        list(finite_units([("m", big)], torch.float16))
    assert len(list(finite_units([("m", big)], torch.bfloat16))) == 1
