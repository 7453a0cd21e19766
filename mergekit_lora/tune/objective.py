"""The tune objective: a YAML naming the base model, few-shot data per task, the metric and an L1 penalty.

Example (paths relative to the YAML file)::

    base: smollm2-135m            # or a transformers folder
    metric: loss                  # loss (mean CE of the gold label token) or accuracy; averaged over tasks
    l1: 0.05                      # LoraHub's penalty: objective += l1 · Σ|w_i|
    tasks:
      - suite: topic              # a suite task: its first `examples` TRAIN examples (never the test set)
        examples: 32
      - name: mine                # your own task: JSONL rows {"text": ..., "label": 0}
        data: mine.jsonl
        before: "Review: "
        after: "\\nVerdict:"
        labels: [" bad", " good"] # one label word per class (first token scored)
      - name: ids                 # token-level rows {"ids": [3, 9, 4], "label": 1} (no tokenizer needed)
        data: toy.jsonl
        label_tokens: [5, 17, 42]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergekit_lora.errors import LoraMergeError


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    suite: str | None = None
    name: str | None = None
    data: str | None = None
    before: str = ""
    after: str = ""
    labels: list[str] | None = None
    label_tokens: list[int] | None = None
    examples: int = Field(32, ge=1, le=100_000)

    @model_validator(mode="after")
    def _one_source(self) -> TaskSpec:
        if (self.suite is None) == (self.data is None):
            raise ValueError("give either `suite: TASK` or `data: FILE.jsonl`")
        if self.data is not None:
            if not self.name:
                raise ValueError("a data task needs a `name`")
            if (self.labels is None) == (self.label_tokens is None):
                raise ValueError("a data task needs either `labels` (label words) or `label_tokens` (ids)")
            n = len(self.labels or self.label_tokens or [])
            if n < 2:
                raise ValueError("a task needs at least 2 classes")
        return self

    @property
    def title(self) -> str:
        return self.name or str(self.suite)


class Objective(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str
    tasks: list[TaskSpec] = Field(min_length=1)
    metric: Literal["loss", "accuracy"] = "loss"
    l1: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    max_text_tokens: int = Field(64, ge=1)
    threads: int = Field(1, ge=1, description="torch threads per trial (fixed, so scores are reproducible)")

    @model_validator(mode="after")
    def _unique(self) -> Objective:
        names = [t.title for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique (got {names})")
        return self


def load_objective(path: str | Path) -> tuple[Objective, Path]:
    """(objective, folder its relative paths resolve from); one LoraMergeError sentence for any problem."""
    p = Path(path)
    if not p.is_file():
        raise LoraMergeError(f"objective {p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LoraMergeError(f"objective {p}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise LoraMergeError(f"objective {p}: expected a mapping with base, tasks, metric (see `loramerge tune --help`)")
    try:
        obj = Objective(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "objective"
        msg = err["msg"].removeprefix("Value error, ")
        raise LoraMergeError(f"objective {p}: {loc}: {msg}") from None
    except TypeError as e:
        raise LoraMergeError(f"objective {p}: {e}") from None
    root = p.resolve().parent
    for t in obj.tasks:
        if t.data is not None and not (root / t.data).is_file():
            raise LoraMergeError(f"objective {p}: task {t.title!r}: data file {t.data} not found (paths are relative "
                                 "to the objective file)")
        if t.suite is not None:
            from mergekit_lora.evals.suite.data import TASKS

            if t.suite not in TASKS:
                raise LoraMergeError(f"objective {p}: unknown suite task {t.suite!r}; available: {', '.join(TASKS)}")
    return obj, root


def read_rows(path: Path, ids: bool) -> list[tuple[str | list[int], int]]:
    """JSONL rows -> (text or ids, label); a bad row is one error naming the file and line."""
    out = []
    key = "ids" if ids else "text"
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            val, label = row[key], int(row["label"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LoraMergeError(f"{path}:{i}: expected a JSON object with {key!r} and an integer 'label'") from None
        out.append((val, label))
    if not out:
        raise LoraMergeError(f"{path}: no examples")
    return out


def encode_objective(obj: Objective, root: Path, tokenizer) -> dict:
    """Task title -> :class:`mergekit_lora.evals.tasks.EncodedTask` (suite tasks: the TRAIN split's first n)."""
    from mergekit_lora.evals.tasks import EncodedTask, encode_task

    out = {}
    for t in obj.tasks:
        if t.suite is not None:
            from mergekit_lora.evals.suite.data import get_task

            task = get_task(t.suite)
            _need_tokenizer(tokenizer, t)
            out[t.title] = encode_task(task, tokenizer, task.split()[0][: t.examples], obj.max_text_tokens)
            continue
        rows = read_rows(root / str(t.data), ids=t.label_tokens is not None)[: t.examples]
        n_cls = len(t.labels or t.label_tokens or [])
        bad = [lab for _, lab in rows if not 0 <= lab < n_cls]
        if bad:
            raise LoraMergeError(f"task {t.title!r}: label {bad[0]} outside 0..{n_cls - 1}")
        gold = torch.tensor([lab for _, lab in rows], dtype=torch.long)
        if t.label_tokens is not None:
            out[t.title] = EncodedTask(t.title, [list(map(int, v)) for v, _ in rows], gold,  # type: ignore[arg-type]
                                       torch.tensor(t.label_tokens))
        else:
            from mergekit_lora.evals.suite.data import Example, Task

            _need_tokenizer(tokenizer, t)
            task = Task(t.title, "", "", t.before, t.after, tuple(t.labels or ()), list)
            out[t.title] = encode_task(task, tokenizer, [Example(str(v), lab) for v, lab in rows], obj.max_text_tokens)
    return out


def _need_tokenizer(tokenizer, t: TaskSpec) -> None:
    if tokenizer is None:
        raise LoraMergeError(f"task {t.title!r} has text but the base model has no tokenizer; use `ids` rows "
                             "with `label_tokens`")
