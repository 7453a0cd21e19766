"""Start-up of the ``loramerge`` process: SIGTERM ends it with exit 143 from the first line on (issue 28).

Imports (typer, rich, the commands) take most of a second; a SIGTERM then used to end the process by
the signal instead of the exit code 143 that a SIGTERM during the merge gives
(``atomic._sigterm_as_exit``).  Installed from ``cli/__init__.py``, i.e. before ``cli/main.py`` imports
anything, and only in the ``loramerge`` process (a program importing the CLI keeps its own handlers).
"""

from __future__ import annotations

import signal
import sys
import threading


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def install() -> bool:
    """SIGTERM -> ``SystemExit(143)`` when still at its default in the main thread; True if installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _raise_exit)
    return True


def is_cli_process() -> bool:
    return sys.argv[0].rsplit("/", 1)[-1].startswith("loramerge") or sys.argv[0].endswith("cli/main.py")
