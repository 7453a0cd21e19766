"""Tuned rows of ``eval compare``: the best setting of a small grid, chosen on a validation slice.

The validation slice is the head of each task's *train* split (:meth:`Task.validation`), never the test
examples the report scores; the choice maximises mean validation accuracy over the tasks (ties: the
first setting in grid order).  Grid keys: ``weight`` sets every input's weight (numbers or ``"1/n"``,
``"2/n"``: n = the number of inputs), ``scale`` the strength policy (``average``, ``1.5*average``, a number);
any other key is a method parameter (numbers or ``"r"``, ``"2r"``,
``"4r"``: r = the largest input rank), e.g. ``{weight: [1/n, 2/n, 1], density: [0.3, 0.5, 0.7]}``.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path
from typing import Any

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.pipeline import MergeRequest, make_options, merge

from .tasks import encode_suite


def resolve_value(value: Any, *, n: int, r: int, key: str) -> float | int:
    """``"2/n"`` -> 2/n, ``"4r"`` -> 4·r, numbers unchanged."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if key == "scale":
        return str(value)
    s = str(value).replace(" ", "")
    if m := re.fullmatch(r"(\d*\.?\d*)/n", s):
        return float(m.group(1) or 1) / n
    if m := re.fullmatch(r"(\d*)r", s):
        return int(m.group(1) or 1) * r
    raise LoraMergeError(f"grid.{key}: {value!r} is not a number, 'a/n' or 'ar'")


def input_rank(paths: dict[str, Path]) -> int:
    ranks = []
    for p in paths.values():
        cfg = Path(p) / "adapter_config.json"
        if cfg.is_file():
            ranks.append(int(json.loads(cfg.read_text()).get("r", 0)))
    return max(ranks, default=0)


def grid_points(grid: dict[str, list[Any]], *, n: int, r: int) -> list[dict[str, Any]]:
    """Every combination of the grid's values, resolved (grid order: last key varies fastest)."""
    keys = list(grid)
    values = [[resolve_value(v, n=n, r=r, key=k) for v in grid[k]] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def tune_spec(spec, weights: list[float], paths: dict[str, Path], cfg, tok, tasks: list[str],
              tmp: Path, scores_of, log) -> tuple[Any, list[float], dict[str, Any]]:
    """(spec with the chosen params, the chosen weights, {chosen, scores}) for a spec with a grid.

    ``scores_of(adapter_folder, encoded_tasks) -> {task: {accuracy, ...}}`` scores one merge.
    """
    n = len(paths)
    points = grid_points(spec.grid or {}, n=n, r=input_rank(paths))
    val = encode_suite(tok, tasks, cfg.validation, cfg.max_text_tokens, split="validation")
    scores = []
    best: tuple[float, dict[str, Any]] | None = None
    for i, point in enumerate(points):
        params, w, scale = _setting(spec, point, weights, n)
        folder = tmp / f"tune-{i}"
        merge(MergeRequest(sources=list(paths.values()), method=spec.method, params=params, weights=w,
                           options=make_options(out=folder, device=cfg.device, seed=cfg.seed, scale=scale)))
        res = scores_of(folder, val)
        shutil.rmtree(folder, ignore_errors=True)
        acc = sum(res[t]["accuracy"] for t in tasks) / len(tasks)
        scores.append({"setting": point, "validation_accuracy": acc,
                       "tasks": {t: res[t]["accuracy"] for t in tasks}})
        log(f"  {point}: validation mean accuracy {acc:.3f}")
        if best is None or acc > best[0]:
            best = (acc, point)
    assert best is not None
    params, w, scale = _setting(spec, best[1], weights, n)
    return type(spec).model_validate({**spec.model_dump(), "params": params, "scale": scale}), w, {
        "chosen": best[1], "scores": scores, "validation_examples": cfg.validation}


def _setting(spec, point: dict[str, Any], weights: list[float], n: int) -> tuple[dict[str, Any], list[float], Any]:
    """(method parameters, weights, scale) of one grid point."""
    params = {**spec.params, **{k: v for k, v in point.items() if k not in ("weight", "scale")}}
    w = [point["weight"]] * n if "weight" in point else weights
    return params, w, point.get("scale", spec.scale)
