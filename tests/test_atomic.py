"""Crash safety of output folders (issue 14): stale temp folders, SIGTERM, ENOSPC, concurrent swaps, umask."""

from __future__ import annotations

import errno
import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from reliab_helpers import assert_one_error, debris, snapshot, write_peft
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError
from mergekit_lora.atomic import atomic_output, remove_stale
from mergekit_lora.cli.main import app

output_mod = importlib.import_module("mergekit_lora.pipeline.output")
ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = dead_pid()
    stale = [tmp_path / f".out.tmp-{dead}-abc", tmp_path / f".out.old-{dead}-def"]
    live = tmp_path / f".out.tmp-{os.getppid()}-xyz"  # a live process's folder is kept
    other = tmp_path / f".other.tmp-{dead}-abc"  # another output's folder is not ours to judge
    for p in [*stale, live, other]:
        (p / "old").mkdir(parents=True)
        (p / "old" / "partial.safetensors").write_bytes(b"x" * 100)
    with atomic_output(out) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new"
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    assert remove_stale(out) == []


def test_unnamed_outputs_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep").write_text("x")
    for out in [Path("."), Path(""), Path(".."), tmp_path]:
        with pytest.raises(LoraMergeError, match="current folder, a parent or a root"):
            with atomic_output(out, force=True):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert not debris(tmp_path.parent)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folder_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


def test_output_created_by_another_process_during_the_run_needs_force(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LoraMergeError, match="was created by another process during this run"):
        with atomic_output(out) as tmp:
            (tmp / "f").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert not debris(tmp_path)


def test_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    real = Path.rename

    def flaky(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError(errno.EIO, "I/O error")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", flaky)
    with pytest.raises(OSError):
        with atomic_output(out, force=True) as tmp:
            (tmp / "f").write_text("new")
    assert (out / "keep").read_text() == "old"
    assert not debris(tmp_path)


# ---------------------------------------------------------------- disk full
def _enospc_writer(req):
    for _ in req.modules:  # consume some modules, write some bytes, then the disk is full
        pass
    (Path(req.out_dir) / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    raise OSError(errno.ENOSPC, "No space left on device", str(Path(req.out_dir) / "adapter_model.safetensors"))


def test_disk_full_is_one_line_and_keeps_the_previous_output(tmp_path, monkeypatch):
    a, b = write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)
    out = tmp_path / "merged"
    assert CliRunner().invoke(app, ["merge", str(a), str(b), "-o", str(out)]).exit_code == 0
    before = snapshot(out, a, b)
    from dataclasses import replace

    real = output_mod.get_writer
    monkeypatch.setattr(output_mod, "get_writer", lambda fmt: replace(real(fmt), write=_enospc_writer))
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "-o", str(out), "--force"])
    flat = assert_one_error(result, ["no space left on the filesystem at", str(out), "4,096 bytes written",
                                     "bytes free", "choose an output on another filesystem"], out=out)
    assert len(result.output.strip().splitlines()) <= 3, flat
    assert snapshot(out, a, b) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "merged"]


# ---------------------------------------------------------------- SIGTERM mid-merge (a real process)
SLOW_MERGE = textwrap.dedent("""
    import sys, time, importlib
    from dataclasses import replace
    from pathlib import Path
    m = importlib.import_module("mergekit_lora.pipeline.output")
    real = m.get_writer
    def slow(req):
        (Path(req.out_dir) / "partial.safetensors").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
    m.get_writer = lambda fmt: replace(real(fmt), write=slow)
    from mergekit_lora.cli.main import main
    sys.argv = ["loramerge", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_merge_cleans_up(tmp_path, sig, code):
    a, b = write_peft(tmp_path / "a", 0), write_peft(tmp_path / "b", 1)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep").write_text("previous")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell's background job (`make test &`, nohup) starts with SIGINT ignored, which the child would
    # inherit (Python then installs no KeyboardInterrupt handler): give it the default disposition
    p = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(a), str(b), "-o", str(out), "--force"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert p.stdout.readline().strip() == "writing"
        assert debris(tmp_path)  # the temp folder exists while it works
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == code, err
    assert "Traceback" not in err
    if sig == signal.SIGINT:  # issue 23: Ctrl-C says so (one line), not a silent exit 130
        assert err.strip().splitlines()[-1] == "interrupted", err
    assert not debris(tmp_path)
    assert [q.name for q in out.iterdir()] == ["keep"]


# ---------------------------------------------------------------- concurrent swaps
RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mergekit_lora.atomic import atomic_output
    out, me, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))  # all racers start swapping together
    for i in range(15):
        with atomic_output(out, force=True) as tmp:
            for k in range(5):
                (tmp / f"part{k}").write_text(f"{me}-{i}")
""")


def test_concurrent_replacements_leave_one_complete_output(tmp_path):
    out = tmp_path / "out"
    start = time.time() + 3  # most racers have imported torch by then
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(n), str(start)], stderr=subprocess.PIPE,
                              text=True) for n in range(3)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    parts = {q.name: q.read_text() for q in out.iterdir()}
    assert sorted(parts) == [f"part{k}" for k in range(5)]
    assert len(set(parts.values())) == 1  # all five files from the same run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_folders_are_cleaned_by_the_next_cli_run(tmp_path):
    """A run killed with SIGKILL leaves its temp folder; the next run of the same output removes it."""
    a = write_peft(tmp_path / "a", 0)
    out = tmp_path / "merged"
    p = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(a), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.stdout.readline().strip() == "writing"
    p.kill()
    p.communicate(timeout=60)
    left = debris(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".merged.tmp-{p.pid}-")
    for _ in range(50):  # the pid is gone once reaped
        if not Path(f"/proc/{p.pid}").exists():
            break
        time.sleep(0.1)
    assert CliRunner().invoke(app, ["merge", str(a), "-o", str(out)]).exit_code == 0
    assert not debris(tmp_path)


def test_the_swap_waits_for_the_lock(tmp_path):
    """While another holder has the output's parent locked, the rename into place waits."""
    import fcntl
    import threading

    out = tmp_path / "out"
    body_done = threading.Event()

    def run():
        with atomic_output(out) as tmp:
            (tmp / "f").write_text("x")
            body_done.set()

    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    t = threading.Thread(target=run)
    try:
        t.start()
        assert body_done.wait(30)
        t.join(timeout=1.0)
        assert t.is_alive() and not out.exists()  # blocked on the lock, nothing renamed yet
    finally:
        os.close(fd)  # releases the lock
    t.join(timeout=30)
    assert (out / "f").read_text() == "x"
    assert not debris(tmp_path)
