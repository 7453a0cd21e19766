"""Issue 28, output-folder faults: temp folders whose PID cannot tell (0, 1, ≥ 2³¹, our own), a full disk
before any byte, inode exhaustion, and SIGTERM during start-up (exit 143, not death by the signal)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from reliab_helpers import assert_one_error, debris, snapshot, write_peft
from typer.testing import CliRunner

from mergekit_lora import atomic
from mergekit_lora.cli.main import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- stale temp folders, any PID
@pytest.mark.parametrize("pid", [0, 1, 2**22 + 1, 2**31, 2**31 + 5, 2**64, 10**30])
def test_temp_folder_with_a_pid_that_cannot_be_a_live_writer_is_removed(tmp_path, pid):
    a, b = write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)
    out = tmp_path / "merged"
    for kind in ("tmp", "old"):
        stale = tmp_path / f".merged.{kind}-{pid}-abcd1234"
        stale.mkdir()
        (stale / "adapter_model.safetensors").write_bytes(b"partial")
    for _ in range(2):  # every later run, too (the OverflowError used to repeat on each)
        r = cli("merge", a, b, "-o", out, "--force")
        assert r.exit_code == 0, r.output
        assert debris(tmp_path) == []


def test_own_pid_folder_from_a_previous_incarnation_is_removed(tmp_path):
    out = tmp_path / "merged"
    (tmp_path / f".merged.tmp-{os.getpid()}-zzzz").mkdir()
    assert [p.name for p in atomic.remove_stale(out)] == [f".merged.tmp-{os.getpid()}-zzzz"]


@pytest.mark.parametrize("pid", [0, 1, 2**31])
def test_a_locked_temp_folder_is_kept_whatever_its_pid(tmp_path, pid):
    """A live writer (this version) holds a flock on its temp folder: never removed under it."""
    out = tmp_path / "merged"
    live = tmp_path / f".merged.tmp-{pid}-live0000"
    live.mkdir()
    fd = atomic._try_lock(live)
    assert fd is not None
    try:
        assert atomic.remove_stale(out) == [] and live.is_dir()
    finally:
        os.close(fd)
    assert atomic.remove_stale(out) == [live]


def test_live_pid_folder_is_kept(tmp_path):
    out = tmp_path / "merged"
    parent_pid = os.getppid()  # alive, not us, not 1 in this test process
    keep = tmp_path / f".merged.tmp-{parent_pid}-keep0000"
    keep.mkdir()
    assert atomic.remove_stale(out) == [] and keep.is_dir()


def test_a_writer_holds_its_temp_folder_locked(tmp_path):
    out = tmp_path / "merged"
    with atomic.atomic_output(out) as tmp:
        assert atomic._try_lock(tmp) is None  # another open file description cannot take it
        assert atomic.remove_stale(out) == []
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x" and debris(tmp_path) == []


# ---------------------------------------------------------------- disk full, inodes
def test_disk_full_before_any_byte_says_so(tmp_path, monkeypatch):
    a, b = write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)
    out = tmp_path / "merged"
    from dataclasses import replace

    import mergekit_lora.pipeline.output as output_mod

    def full(req):
        for _ in req.modules:
            pass
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(req.out_dir) / "adapter_model.safetensors"))

    real = output_mod.get_writer
    monkeypatch.setattr(output_mod, "get_writer", lambda fmt: replace(real(fmt), write=full))
    before = snapshot(a, b)
    flat = assert_one_error(cli("merge", a, b, "-o", out), ["no space left on the filesystem at", str(out),
                                                             "before any byte of it was written", "bytes free",
                                                             "with the partial output removed"], out=out)
    assert "0 bytes written" not in flat
    assert snapshot(a, b) == before and not out.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_no_inode_for_the_temp_folder_names_the_output_not_a_temp(tmp_path, monkeypatch, code):
    a, b = write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)
    out = tmp_path / "merged"

    def no_inode(prefix=None, dir=None, **kw):
        raise OSError(code, os.strerror(code), os.path.join(dir, f"{prefix}q1w2e3r4"))

    monkeypatch.setattr(tempfile, "mkdtemp", no_inode)
    flat = assert_one_error(cli("merge", a, b, "-o", out), [f"cannot create the output {out}",
                                                             "no space left on the filesystem at", "free space or inodes"],
                            out=out)
    assert ".tmp-" not in flat and "q1w2e3r4" not in flat, flat


def test_other_temp_folder_errors_name_an_existing_folder(tmp_path, monkeypatch):
    out = tmp_path / "merged"

    def denied(prefix=None, dir=None, **kw):
        raise OSError(errno.EACCES, "Permission denied", os.path.join(dir, f"{prefix}q1w2e3r4"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(atomic.LoraMergeError) as e:
        with atomic.atomic_output(out):
            pass
    assert "q1w2e3r4" not in str(e.value) and str(tmp_path) in str(e.value)


# ---------------------------------------------------------------- SIGTERM during start-up
def _catches_sigterm(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status (Linux)")
def test_sigterm_during_startup_exits_143():
    """SIGTERM as soon as the handler is in (before typer, rich and the commands are imported)."""
    exe = Path(sys.executable).with_name("loramerge")
    if not exe.exists():
        pytest.skip("the loramerge script is not installed beside this interpreter")
    for _ in range(5):
        p = subprocess.Popen([str(exe), "methods"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while p.poll() is None and not _catches_sigterm(p.pid) and time.monotonic() < deadline:
            time.sleep(0.001)
        if p.poll() is not None:
            continue  # finished before we looked: try again
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        err = p.stderr.read().decode()
        assert rc in (143, 0), (rc, err)  # 0: it had already finished its work
        assert "Traceback" not in err, err
        if rc == 143:
            return
    pytest.fail("never caught loramerge at start-up")


def test_sigterm_handler_is_installed_by_the_cli_package_only_for_loramerge():
    code = ("import sys, os, signal; sys.argv[0] = '/usr/bin/loramerge'; import mergekit_lora.cli; "
            "os.kill(os.getpid(), signal.SIGTERM); import time; time.sleep(5)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 143
    code = "import signal, mergekit_lora.cli; assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
