"""Merge workers: Ray actors that import torch and the package once and merge many tasks of a plan.

A worker's first use pays its cold start (a Python process importing torch and mergekit_lora: 2–4 s on
a small CPU); its later tasks pay only a round trip (≈ 5–10 ms).  A plan is sent to each worker once
per merge (:meth:`MergeWorker.load`), its tasks then name only their module batches.

Two lifetimes:

- **per call** (local Ray started by the merge, or an in-process session): the actors are killed when
  the merge ends (and a local Ray started for it is shut down by the caller);
- **kept warm** (joining a running cluster with an address): the actors are *detached* and named
  ``loramerge-merge-<code fingerprint>-<i>`` in the ``loramerge`` namespace, so the next merge of any
  driver with the same code finds them already warm.  A kept worker kills itself after ``idle_s``
  seconds without work (it holds one CPU while alive); workers of other code (an upgraded package) are
  retired when a pool is acquired, so a cluster keeps one warm pool.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import mergekit_lora
from mergekit_lora.pipeline import MergePlan

from . import core
from .session import import_ray

NAMESPACE = "loramerge"
PREFIX = "loramerge-merge"
PLANS_KEPT = 4  # plans a worker holds at once (concurrent merges sharing a kept pool)


class MergeWorker:
    """The body of one merge actor (``ray.remote`` is applied by :class:`MergePool`)."""

    def __init__(self, idle_s: float | None = None) -> None:
        self.plans: OrderedDict[str, MergePlan] = OrderedDict()
        self.busy = 0
        self.last = time.monotonic()
        if idle_s:
            threading.Thread(target=self._expire, args=(float(idle_s),), daemon=True).start()

    def ping(self) -> tuple[int, float]:
        """(process id, CPU seconds this process has used since it started)."""
        self.last = time.monotonic()
        return os.getpid(), time.process_time()

    def load(self, token: str, plan: MergePlan) -> tuple[int, float]:
        self.plans[token] = plan
        while len(self.plans) > PLANS_KEPT:
            self.plans.popitem(last=False)
        return self.ping()

    def merge(self, token: str, batches: list[list[str]]) -> list[tuple[str, Any, Any, Any]]:
        self.busy += 1
        try:
            return core.merge_batch_list(self.plans[token], batches)
        finally:
            self.busy -= 1
            self.last = time.monotonic()

    def drop(self, token: str) -> None:
        self.plans.pop(token, None)
        self.last = time.monotonic()

    def _expire(self, idle_s: float) -> None:
        while self.busy or time.monotonic() - self.last < idle_s:
            time.sleep(min(1.0, idle_s / 4))
        ray = import_ray()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def code_fingerprint() -> str:
    """A hash of the package's source, Python and torch versions: kept workers run the driver's code."""
    h = hashlib.sha256(f"{sys.version}|{torch.__version__}".encode())
    root = Path(mergekit_lora.__file__).parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class MergePool:
    """``workers`` merge actors (``num_cpus=1`` each, ``num_gpus=1`` with ``gpu``); ``idle_s``: keep them
    warm (detached, named) and let each expire after that many idle seconds; None: per call."""

    def __init__(self, ray: Any, workers: int, *, idle_s: float | None = None, gpu: bool = False) -> None:
        self.ray, self.idle_s, self.gpu = ray, idle_s, gpu
        self.fingerprint = code_fingerprint() if idle_s else ""
        self.warm = [False] * workers  # slot held a live kept worker before this merge
        if idle_s:
            live = self._named()
            for name in live:  # other code's warm pool: retire it (it holds CPUs)
                if not name.startswith(f"{PREFIX}-{self.fingerprint}-"):
                    self._kill(name)
            self.warm = [self._name(i) in live for i in range(workers)]
        self.reused = sum(self.warm)
        self.actors = [self._start(i) for i in range(workers)]

    def _name(self, slot: int) -> str:
        return f"{PREFIX}-{self.fingerprint}-{slot}"

    def _named(self) -> set[str]:
        return {a["name"] for a in self.ray.util.list_named_actors(all_namespaces=True)
                if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX)}

    def _kill(self, name: str) -> None:
        try:
            self.ray.kill(self.ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:  # gone meanwhile
            pass

    def _start(self, slot: int) -> Any:
        cls = self.ray.remote(MergeWorker)
        opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if self.gpu else 0, "max_restarts": 0}
        if self.idle_s:
            opts.update(name=self._name(slot), namespace=NAMESPACE, lifetime="detached", get_if_exists=True)
        return cls.options(**opts).remote(self.idle_s)

    def replace(self, slot: int) -> Any:
        """A fresh actor in ``slot`` (its predecessor died: killed, expired, out of memory)."""
        if self.idle_s:
            self._kill(self._name(slot))
        else:
            self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start(slot)
        self.warm[slot] = False
        return self.actors[slot]

    def usage(self) -> list[tuple[int, float]]:
        """(process id, CPU seconds since it started) of each worker."""
        return self.ray.get([a.ping.remote() for a in self.actors])

    def close(self, token: str) -> None:
        """Forget the plan ``token``; a per-call pool's actors are killed."""
        for a in self.actors:
            if self.idle_s:
                a.drop.remote(token)
            else:
                self.ray.kill(a, no_restart=True)


def release_kept(ray: Any) -> int:
    """Kill every kept merge worker of this cluster (any code version); returns how many there were."""
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX)}
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
    return len(names)


def loaded(pool: MergePool, token: str, plan_ref: Any, slots: Sequence[int] | None = None) -> list[Any]:
    """Send the plan (an object-store reference, put once) to the workers in ``slots`` (default: all);
    references to their (process id, CPU seconds) at load."""
    return [pool.actors[s].load.remote(token, plan_ref) for s in (range(len(pool.actors)) if slots is None else slots)]
