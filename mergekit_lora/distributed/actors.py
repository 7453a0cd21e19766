"""Tune trials on Ray: one actor per worker holds the base model (loaded once), trials are its method calls.

The pool is handed the worker class it runs (``tune``'s evaluator: ``__init__(*args, worker=…, **kwargs)``,
``ping()``, ``run(trial) -> row``), so this floor imports nothing of the search above it.

A batch of trials goes out at once (trial i to actor i), results are collected in trial order.  An
actor that dies mid-trial (killed, out of memory) is restarted by Ray once and its trial retried once;
a second death makes the trial an error row and the search goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mergekit_lora.errors import LoraMergeError

from .session import cluster_gpus, ensure_ray


class RayTrialPool:
    def __init__(self, worker: type, workers: int, evaluator_args: tuple, evaluator_kwargs: dict[str, Any], *,
                 address: str | None = None, device: str = "auto") -> None:
        from .session import import_ray

        self.started = not import_ray().is_initialized()  # shut down on close only what this pool started
        self.ray = ensure_ray(address, workers)
        gpus = cluster_gpus(self.ray)
        if str(device).startswith("cuda") and gpus == 0:
            raise LoraMergeError("device cuda was requested but the Ray cluster has no GPU; use device cpu or auto")
        num_gpus = 1 if gpus and device != "cpu" else 0
        cls = self.ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=1, max_task_retries=0)(worker)
        self.actors = [cls.remote(*evaluator_args, **{**evaluator_kwargs, "worker": f"ray-{i}"})
                       for i in range(workers)]
        try:
            self.ray.get([a.ping.remote() for a in self.actors])
        except self.ray.exceptions.RayActorError as e:
            raise LoraMergeError(f"a tune worker could not start: {_cause(e)}") from None

    def run_batch(self, trials: Sequence[dict[str, Any]], on_row: Callable[[dict[str, Any]], None]) -> None:
        refs = [self.actors[i].run.remote(t) for i, t in enumerate(trials)]
        for i, (t, ref) in enumerate(zip(trials, refs)):
            try:
                row = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                try:  # Ray restarts the actor once (max_restarts=1): retry the trial once on it
                    row = self.ray.get(self.actors[i].run.remote(t))
                    row["retried"] = True
                except self.ray.exceptions.RayActorError as e:
                    row = {"trial": t["trial"], "params": t["params"], "weights": t["weights"], "score": None,
                           "metric": None, "tasks": None, "error": f"worker died twice: {_cause(e)}",
                           "seconds": 0.0, "worker": f"ray-{i}"}
            on_row(row)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        if self.started:
            self.ray.shutdown()


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    errs = [ln for ln in text if "Error" in ln]
    return (errs[-1] if errs else text[-1] if text else type(e).__name__)[:300]
