"""Atomic output folders: write into a temp folder beside the target, then rename into place.

What holds (Linux/macOS, one local filesystem):

- a reader never sees a half-written output: the folder appears by one ``rename``;
- a failed, interrupted (Ctrl-C) or terminated (SIGTERM, exit 143) run removes its temp folder and
  leaves a previous output untouched;
- a run killed outright (SIGKILL, power loss) leaves ``.OUT.tmp-PID-*``; the next run for the same
  output removes such folders when process PID is gone (a live PID's folder is kept);
- two runs replacing the same output take turns (``fcntl.flock`` on the output's parent folder)
  for the swap, so the result is one complete output from one of them and no ``.OUT.old-*`` debris;
- a full disk (ENOSPC) is one error naming the filesystem and the bytes involved, with the temp
  folder removed;
- the output folder gets the permissions of ``mkdir`` under the current umask (not mkdtemp's 0700).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LoraMergeError

TERM_EXIT = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM


def check_output(out: Path, force: bool) -> None:
    """Fail early (before any heavy work) if ``out`` exists and ``force`` is not set."""
    out = Path(out)
    _refuse_unnamed(out)
    try:
        mode = out.stat().st_mode  # one stat: a concurrent swap may move ``out`` between two checks
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # what Path.exists() counts as absent
            return
        raise
    if not force:
        raise LoraMergeError(f"{out} already exists; choose another output or pass «force» to replace it",
                             field="out")
    if not stat.S_ISDIR(mode):
        raise LoraMergeError(f"{out} exists and is not a folder", field="out")


def _refuse_unnamed(out: Path) -> None:
    raw = str(out)
    full = Path(os.path.abspath(out)) if raw else Path.cwd()
    if raw in ("", ".", "..") or out.name in ("", ".", "..") or full == Path.cwd() or full == Path(full.anchor):
        raise LoraMergeError(f"output path {raw!r} is the current folder, a parent or a root; "
                             "name a new folder for the output")


def _umask() -> int:
    """The process umask without changing it (Linux: /proc), else by the set-and-restore idiom."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID-*`` folders beside ``out`` whose process PID is gone."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-")
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def _dir_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file is left behind)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Inside: SIGTERM raises ``SystemExit(143)`` so cleanup runs like for Ctrl-C; restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(TERM_EXIT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block ends (the swap is never left half-done)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _folder_bytes(p: Path) -> int:
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _mount_point(p: Path) -> Path:
    p = p.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _no_space(out: Path, tmp: Path) -> LoraMergeError:
    written = _folder_bytes(tmp)
    try:
        st = os.statvfs(out.parent)
        free = f"{st.f_bavail * st.f_frsize:,} bytes free"
    except OSError:
        free = "free space unknown"
    return LoraMergeError(
        f"no space left on the filesystem at {_mount_point(out.parent)} while writing {out}: the output needs "
        f"more than the {written:,} bytes written before it ran out ({free}); nothing was written, free space "
        "or choose an output on another filesystem")


def _make_temp(out: Path, kind: str) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise LoraMergeError(f"cannot create the output {out}: {e.strerror or e} ({e.filename or out.parent}); "
                             "choose another output") from None


@contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out``, on any error it is removed.

    A reader never sees a half-written output, and an existing output survives a failed run.
    """
    out = Path(out)
    check_output(out, force)
    remove_stale(out)
    tmp = _make_temp(out, "tmp")
    try:
        with _sigterm_as_exit():
            try:
                yield tmp
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _no_space(out, tmp) from None
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG) and \
                        str(e.filename or "").startswith(str(tmp)):
                    raise LoraMergeError(f"cannot write the output {out}: {e.strerror}; choose another output") from None
                raise
            with contextlib.suppress(OSError):
                tmp.chmod(0o777 & ~_umask())
            _swap(out, tmp, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(out: Path, tmp: Path, force: bool) -> None:
    """Move ``tmp`` to ``out`` (replacing it when ``force``) under the parent's lock, signals deferred."""
    with _signals_deferred(), _dir_lock(out.parent):
        if out.exists() or out.is_symlink():
            if not force:
                raise LoraMergeError(f"{out} was created by another process during this run; "
                                     "pass «force» to replace it, or choose another output", field="out")
            if not out.is_dir():
                raise LoraMergeError(f"{out} exists and is not a folder")
            trash = _make_temp(out, "old")
            try:
                out.rename(trash / "old")
            except BaseException:
                shutil.rmtree(trash, ignore_errors=True)
                raise
            try:
                tmp.rename(out)
            except BaseException:
                (trash / "old").rename(out)  # put the previous output back
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
