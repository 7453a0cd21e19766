"""Atomic output folders: write into a temp folder beside the target, then rename into place.

What holds (Linux/macOS, one local filesystem):

- a reader never sees a half-written output: the folder appears by one ``rename``;
- a failed, interrupted (Ctrl-C) or terminated (SIGTERM, exit 143) run removes its temp folder and
  leaves a previous output untouched;
- a run killed outright (SIGKILL, power loss) leaves ``.OUT.tmp-PID-*``; the next run for the same
  output removes such folders when process PID is gone (a live PID's folder is kept); a writer holds
  a ``flock`` on its temp folder, so a folder whose PID cannot tell (0, 1, beyond any PID, our own) is
  removed only when unlocked (issue 28);
- two runs replacing the same output take turns (``fcntl.flock`` on the output's parent folder)
  for the swap, so the result is one complete output from one of them and no ``.OUT.old-*`` debris;
- a full disk (ENOSPC) is one error naming the filesystem and the bytes involved, with the temp
  folder removed;
- the output folder gets the permissions of ``mkdir`` under the current umask (not mkdtemp's 0700).

An output that is one file (:func:`atomic_file`, ``export``) is written into such a temp folder and its
file renamed onto the target: the same guarantees, a file's permissions (``0o666`` under the umask).
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


PID_LIMIT = 1 << 22  # Linux's PID_MAX_LIMIT (64-bit); macOS PIDs stay below 100,000


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process; 0 and numbers beyond any PID (2**31: OverflowError in
    ``os.kill``, issue 28) name none."""
    if pid <= 0 or pid > PID_LIMIT:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _try_lock(p: Path) -> int | None:
    """An fd holding an exclusive non-blocking ``flock`` on folder ``p``, or None when a live writer holds
    it (or it cannot be opened)."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _stale(pid: int) -> bool:
    """A temp/old folder nobody is writing: its PID is not a live process, or (unlocked) it is a PID that
    cannot tell — 0, beyond any PID, 1 (init: never our dead writer, but PID 1 in a container may have
    been one) or this process's own PID (a previous incarnation).  Every live writer of this version
    holds a ``flock`` on its temp folder, so an unlocked folder with such a PID is nobody's (within one
    process, :data:`_CREATING` closes the gap between creating a folder and locking it)."""
    if pid in (1, os.getpid()) or not (0 < pid <= PID_LIMIT):
        return True
    return not _pid_alive(pid)


def remove_stale(out: Path) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID-*`` folders beside ``out`` that no live writer holds:
    unlocked, and process PID gone (or a PID that cannot be a live writer, see :func:`_stale`)."""
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-")
    removed: list[Path] = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    with _CREATING:
        for p in siblings:
            m = pat.match(p.name)
            if not m or p.is_symlink() or not p.is_dir() or not _stale(int(m.group(1))):
                continue
            fd = _try_lock(p)
            if fd is None:  # a live writer (this version) holds it
                continue
            try:
                shutil.rmtree(p, ignore_errors=True)
            finally:
                os.close(fd)
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


def _free_text(folder: Path) -> str:
    try:
        st = os.statvfs(folder)
    except OSError:
        return "free space unknown"
    text = f"{st.f_bavail * st.f_frsize:,} bytes free"
    if st.f_files and not st.f_favail:  # f_files 0: a filesystem without inode counts
        text += f", no free inodes (of {st.f_files:,})"
    return text


def _no_space(out: Path, tmp: Path) -> LoraMergeError:
    """ENOSPC/EDQUOT while writing: what was written, then the free space once the partial output is gone
    (so the numbers are true together; issue 28: "0 bytes written … 1,953,792 bytes free")."""
    written = _folder_bytes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    done = f"after {written:,} bytes written" if written else "before any byte of it was written"
    return LoraMergeError(
        f"no space left on the filesystem at {_mount_point(out.parent)} while writing {out}: it ran out {done} "
        f"({_free_text(out.parent)} with the partial output removed; a disk quota, reserved blocks or another "
        "writer may leave less than that usable); nothing was written, free space or choose an output on "
        "another filesystem")


def _make_temp(out: Path, kind: str) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # issue 28: name the folder, not a temp that never existed
            raise LoraMergeError(f"cannot create the output {out}: no space left on the filesystem at "
                                 f"{_mount_point(out.parent)} ({_free_text(out.parent)}); free space or inodes, "
                                 "or choose an output on another filesystem") from None
        where = e.filename if e.filename and Path(e.filename).exists() else out.parent
        raise LoraMergeError(f"cannot create the output {out}: {e.strerror or e} ({where}); "
                             "choose another output") from None


# Held while a temp folder is created and locked, and while stale ones are looked for: another thread of
# this process never sees our own fresh folder unlocked.
_CREATING = threading.Lock()


@contextmanager
def _locked_temp(out: Path, kind: str) -> Iterator[Path]:
    """A new temp folder beside ``out``, with an exclusive ``flock`` held on it for the block:
    :func:`remove_stale` in another run never removes a locked folder, whatever its PID says."""
    with _CREATING:
        folder = _make_temp(out, kind)
        fd = _try_lock(folder)
    try:
        yield folder
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out``, on any error it is removed.

    A reader never sees a half-written output, and an existing output survives a failed run.
    """
    out = Path(out)
    check_output(out, force)
    remove_stale(out)
    with _locked_temp(out, "tmp") as tmp, _guarded(out, tmp, force):
        yield tmp


def check_file_output(out: Path, force: bool) -> None:
    """:func:`check_output` for an output that is one file: it may replace a file (with ``force``), never a folder."""
    out = Path(out)
    _refuse_unnamed(out)
    if out.is_dir():
        raise LoraMergeError(f"{out} is a folder; name a file for the output", field="out")
    if (out.exists() or out.is_symlink()) and not force:
        raise LoraMergeError(f"{out} already exists; choose another output or pass «force» to replace it",
                             field="out")


@contextmanager
def atomic_file(out: Path, member: str, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside the file ``out``; on success its file ``member`` replaces ``out`` (one
    ``rename``), on any error the folder is removed.  The same guarantees as :func:`atomic_output` (stale
    temp folders, SIGTERM, a full disk, the umask), for an output that is one file (``export``)."""
    out = Path(out)
    check_file_output(out, force)
    remove_stale(out)
    with _locked_temp(out, "tmp") as tmp, _guarded(out, tmp, force, member):
        yield tmp


def _swap_file(out: Path, tmp: Path, member: str, force: bool) -> None:
    """Move the file ``tmp/member`` to ``out`` under the parent's lock, signals deferred, then drop ``tmp``."""
    src = tmp / member
    with contextlib.suppress(OSError):
        src.chmod(0o666 & ~_umask())
    with _signals_deferred(), _dir_lock(out.parent):
        if out.is_dir():
            raise LoraMergeError(f"{out} is a folder; name a file for the output", field="out")
        if (out.exists() or out.is_symlink()) and not force:
            raise LoraMergeError(f"{out} was created by another process during this run; "
                                 "pass «force» to replace it, or choose another output", field="out")
        os.replace(src, out)
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _guarded(out: Path, tmp: Path, force: bool, member: str | None = None) -> Iterator[None]:
    """The body of :func:`atomic_output` / :func:`atomic_file`: errors become one line, success swaps
    ``tmp`` (or its file ``member``) in, anything else removes ``tmp``."""
    try:
        with _sigterm_as_exit():
            try:
                yield
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _no_space(out, tmp) from None
                if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG) and \
                        str(e.filename or "").startswith(str(tmp)):
                    raise LoraMergeError(f"cannot write the output {out}: {e.strerror}; choose another output") from None
                raise
            if member is not None:
                _swap_file(out, tmp, member, force)
                return
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
            with _locked_temp(out, "old") as trash:
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
