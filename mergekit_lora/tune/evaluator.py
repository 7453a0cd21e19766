"""One tune worker: the base model and the inputs loaded once; each trial merges in memory and scores.

The same class runs in-process (``--no-ray``) and as a Ray actor (one per worker), so a trial's
score does not depend on where it ran (torch threads are fixed by the objective's ``threads``).
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mergekit_lora.distributed import core
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions, make_options
from mergekit_lora.request import MergeRequest

from .objective import Objective, encode_objective
from .space import split_scale


def load_model(base: str, device: torch.device):
    """(model, tokenizer or None): the suite's packaged model by name, else a transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mergekit_lora.evals.suite.model import resolve_base

    hf_logging.disable_progress_bar()
    folder = Path(resolve_base(base))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(folder)) if has_tok else None
    return model, tok


def objective_value(obj: Objective, per_task: dict[str, dict[str, float]], weights: list[float]) -> tuple[float, float]:
    """(metric averaged over tasks, value minimised = loss or −accuracy, plus l1·Σ|w|)."""
    metric = sum(s[obj.metric] for s in per_task.values()) / len(per_task)
    value = (metric if obj.metric == "loss" else -metric) + obj.l1 * sum(abs(w) for w in weights)
    return metric, value


class Evaluator:
    """Scores trials: ``run(trial) -> row`` (never raises for a trial's own failure: an error row)."""

    def __init__(self, objective: Objective, root: str | Path, sources: list[Any], method: str,
                 start: dict[str, Any], *, options: MergeOptions, worker: str = "local") -> None:
        from mergekit_lora.pipeline import resolve_device

        self.obj, self.method, self.worker, self.start_params = objective, method, worker, dict(start["params"])
        self.device = resolve_device(options.device)
        opts = make_options(options, out=None, progress=False, device=str(self.device))
        with self._threads():
            self.model, tok = load_model(objective.base, self.device)
            self.tasks = encode_objective(objective, Path(root), tok)
        self.pad_id = int(getattr(tok, "pad_token_id", None) or getattr(tok, "eos_token_id", None) or 0)
        # the inputs' headers are read once; every trial re-plans these adapters with its own settings
        params, scale = split_scale(start["params"])
        self.plan = core.make_plan(MergeRequest(sources=list(sources), method=method, params=params,
                                                weights=start["weights"],
                                                options=opts if scale is None else make_options(opts, scale=scale)))

    def _threads(self):
        obj = self

        class _Fixed:
            def __enter__(self) -> None:
                self.prev = torch.get_num_threads()
                torch.set_num_threads(obj.obj.threads)

            def __exit__(self, *exc: Any) -> None:
                torch.set_num_threads(self.prev)

        return _Fixed()

    def run(self, trial: dict[str, Any]) -> dict[str, Any]:
        """``trial``: {"trial", "weights", "params"} -> the trials.jsonl row (score None on error)."""
        from mergekit_lora.evals.tasks import score

        t0 = time.perf_counter()
        row: dict[str, Any] = {"trial": trial["trial"], "params": trial["params"], "weights": trial["weights"]}
        try:
            with self._threads():
                params, scale = split_scale({**self.start_params, **trial["params"]})
                units = core.merged_units(self.plan, params, trial["weights"], scale)
                from .attach import attached_units

                with torch.no_grad(), attached_units(self.model, units) as m:
                    per_task = {name: score(m, enc, batch_size=self.obj.batch_size, device=self.device,
                                            pad_id=self.pad_id).as_dict() for name, enc in self.tasks.items()}
            metric, value = objective_value(self.obj, per_task, trial["weights"])
            if not math.isfinite(value):
                raise ValueError(f"the objective is {value}")
            row.update(score=value, metric=metric, tasks=per_task, error=None)
        except (LoraMergeError, ValueError, RuntimeError) as e:
            row.update(score=None, metric=None, tasks=None,
                       error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
        except Exception as e:  # a bug in a trial must not end a long search: recorded with its traceback tail
            tb = traceback.format_exc().strip().splitlines()[-1]
            row.update(score=None, metric=None, tasks=None, error=f"{type(e).__name__}: {e} ({tb})"[:300])
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row["worker"] = self.worker
        return row

    def ping(self) -> str:
        return self.worker
