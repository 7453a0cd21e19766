"""Progress on long work: a rich bar on a terminal, plain periodic lines when stderr is not one (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PLAIN_EVERY_S = 10.0


class PlainProgress:
    """The subset of ``rich.progress.Progress`` the pipeline uses, printing a line every ``every`` seconds."""

    def __init__(self, every: float = PLAIN_EVERY_S, stream: Any = None) -> None:
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        self.tasks: dict[int, list[Any]] = {}  # id -> [description, total, done, started, last printed]

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.tasks.values():
            if t[2] and exc[0] is None and time.monotonic() - t[3] >= self.every:
                self._line(t)

    def add_task(self, description: str, total: int | None = None) -> int:
        now = time.monotonic()
        self.tasks[len(self.tasks)] = [description, total, 0, now, now]
        return len(self.tasks) - 1

    def advance(self, task: int, advance: int = 1) -> None:
        t = self.tasks[task]
        t[2] += advance
        if time.monotonic() - t[4] >= self.every:
            self._line(t)

    def _line(self, t: list[Any]) -> None:
        t[4] = time.monotonic()
        of = f"/{t[1]}" if t[1] else ""
        print(f"{t[0]}: {t[2]}{of} after {t[4] - t[3]:.0f} s", file=self.stream, flush=True)


def progress_bar(enabled: bool) -> Progress | PlainProgress:
    """A transient rich bar on a terminal; plain lines every 10 s otherwise; nothing when disabled."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=True, disable=not enabled)
