"""Dynamic batching: one worker thread, one queue per target, batches of one target only.

The worker takes the target whose oldest request has waited longest, waits up to ``window_s`` (from
that request's arrival) for more requests *of the same target* up to ``max_batch``, and runs them as one
batch (one forward per step for all rows).  Two targets never share a forward pass: a PEFT adapter is a
``set_adapter`` switch and a routed adapter its own module tree.  ``auto`` requests are first scored in a
batch of their own (:meth:`Engine.select`) and then queued, with their arrival time, on the chosen target.

Results go to each job's ``sink`` as events from the worker thread: ``("adapters", [...])`` before the
first text, ``("text", piece)`` (streamed jobs only), then ``("done", row)`` or ``("error", message)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .decode import Row, Sampling
from .engine import AUTO, Engine

log = logging.getLogger("mergekit_lora.serve")


@dataclass
class Job:
    target: str
    ids: list[int]
    sampling: Sampling
    sink: Callable[[tuple[str, Any]], None]
    stream: bool = False  # text events only for streamed answers (the others read the finished row)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class Busy(Exception):
    """The queue is full: the server answers 503 instead of letting requests pile up."""


class Batcher:
    def __init__(self, engine: Engine, *, max_batch: int = 8, window_s: float = 0.005, max_queue: int = 1024) -> None:
        self.engine = engine
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_s))
        self.max_queue = int(max_queue)
        self._queues: dict[str, deque[Job]] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.rows = 0
        self.largest = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="loramerge-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is queued, then end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise Busy("the server is shutting down")
            if sum(len(q) for q in self._queues.values()) >= self.max_queue:
                raise Busy(f"{self.max_queue} requests are already queued; retry later")
            self._queues.setdefault(job.target, deque()).append(job)
            self._cv.notify_all()

    # -- the worker --------------------------------------------------------------------------------------
    def _take(self) -> tuple[str, list[Job]] | None:
        with self._cv:
            while True:
                ready = [k for k, q in self._queues.items() if q]
                if ready:
                    break
                if self._stopping:
                    return None
                self._cv.wait()
            key = min(ready, key=lambda k: self._queues[k][0].arrived)
            q = self._queues[key]
            while len(q) < self.max_batch and not self._stopping:
                left = q[0].arrived + self.window_s - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = [q.popleft() for _ in range(min(self.max_batch, len(q)))]
        return key, [j for j in batch if not j.cancelled]

    def _loop(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            key, batch = got
            if not batch:
                continue
            try:
                if key == AUTO:
                    self._route(batch)
                else:
                    self._run(key, batch)
            except Exception as e:  # a bug or an out-of-memory: every job of the batch gets an answer
                log.exception("batch on %s failed", key)
                for j in batch:
                    j.sink(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _route(self, batch: list[Job]) -> None:
        chosen = self.engine.select([j.ids for j in batch])
        with self._cv:
            for j, name in reversed(list(zip(batch, chosen))):  # keep arrival order at the queue's head
                j.target = name
                self._queues.setdefault(name, deque()).appendleft(j)
            self._cv.notify_all()

    def _run(self, key: str, batch: list[Job]) -> None:
        target = self.engine.targets[key]
        rows = []
        for j in batch:
            j.sink(("adapters", list(target.adapters)))
            on_text = (lambda p, j=j: j.sink(("text", p))) if j.stream else None
            rows.append(Row(list(j.ids), j.sampling, on_text=on_text, cancelled=lambda j=j: j.cancelled))
        self.engine.run(target, rows)
        self.batches += 1
        self.rows += len(rows)
        self.largest = max(self.largest, len(rows))
        for j, r in zip(batch, rows):
            j.sink(("done", r))
