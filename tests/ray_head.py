"""A Ray cluster of its own for the tests that join one by address (``ray start --head``, 2 CPUs).

Started with this interpreter (so its workers import this checkout), on a free port, with a temp dir of
its own; stopped by ending exactly its processes (found by that temp dir, and their children) — never
``ray stop``, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def head_pids(temp_dir: str) -> set[int]:
    """The cluster's processes: those naming its temp dir, and all their descendants (never this process
    or its ancestors, whose command lines may name the dir too)."""
    procs = _procs()
    mine, pid = set(), os.getpid()
    while pid in procs and pid not in mine:
        mine.add(pid)
        pid = procs[pid][0]
    pids = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd} - mine
    grown = True
    while grown:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in pids} - pids
        pids |= kids
        grown = bool(kids)
    return pids


def stop_head(temp_dir: str, wait_s: float = 10.0) -> set[int]:
    pids = head_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
    return pids


STARTED: dict[str, str] = {}  # address -> temp dir of the heads started here


def head_temp_dir(address: str) -> str:
    return STARTED[address]


def start_head(cpus: int = 2) -> Iterator[str]:
    """Yield the address of a fresh head node; end its processes afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    address = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={address.split(':')[1]}",
           f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    try:
        r = subprocess.run(cmd, env=head_env(), capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"ray start failed: {r.stderr[-2000:]}")
        STARTED[address] = temp_dir
        yield address
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
