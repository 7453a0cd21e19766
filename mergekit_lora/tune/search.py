"""The search loop: ask a batch of ``workers`` candidates, evaluate them (in-process or on Ray actors),
append each finished trial to ``trials.jsonl``, tell the optimiser, repeat until the budget is spent;
then write the best adapter (like ``merge``, with its recipe), ``tune.png`` and ``tune.json``.

Batches are asked and told whole, so the trial sequence depends only on the settings and the scores,
not on where or how fast trials ran: ``--no-ray`` and Ray give the same trials and the same best bytes.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mergekit_lora.checks import weight_count
from mergekit_lora.distributed import core
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions, make_options
from mergekit_lora.request import MergeRequest

from .objective import load_objective
from .optimizers import make_optimizer
from .space import build_space, split_scale
from .trials import append_row, read_trials, rewrite


@dataclass(frozen=True)
class TuneSettings:
    """A search: the request it tunes and how to search it.

    ``request``: the inputs, the method, its fixed parameters (and start values of searched ones), the start
    weights (fixed when weights are not searched) and the run options (``options.seed`` seeds the optimiser
    too); trials change its parameters and weights only.
    """

    request: MergeRequest
    objective: str
    out: str
    search: list[str] = field(default_factory=lambda: ["weights"])
    budget: int = 32
    optimizer: str = "nevergrad"
    workers: int = 1
    use_ray: bool = True
    ray_address: str | None = None
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, Any]:
        p = self.request.params
        return p.model_dump() if isinstance(p, BaseModel) else dict(p or {})

    def header(self) -> dict[str, Any]:
        """What a resumed search must share with the recorded one."""
        r, o = self.request, self.request.options
        d = {"sources": [str(x) for x in r.sources], "method": r.method, "objective": self.objective,
             "search": self.search, "budget": self.budget, "optimizer": self.optimizer, "workers": self.workers,
             "seed": o.seed, "params": self.params, "weights": r.weights,
             "ranges": {k: list(v) for k, v in self.ranges.items()}, "missing": o.missing,
             "allow_pickle": o.allow_pickle}
        if o.scale != "auto":  # recorded only when set: searches recorded before it was passed on still resume
            d["scale"] = o.scale
        return json.loads(json.dumps(d))


@dataclass
class TuneResult:
    best: dict[str, Any]
    start: dict[str, Any]
    rows: list[dict[str, Any]]
    out: Path
    adapter: Path


def pooled_rank(adapters: list) -> int:
    """The largest summed input rank of any module (the natural upper bound of rank/k/top_k)."""
    names = {n for a in adapters for n in a.modules}
    return max(sum(a.modules[n].rank for a in adapters if n in a.modules) for n in names)


def merge_options(s: TuneSettings, out: Path | None = None) -> MergeOptions:
    """The request's run options, writing to ``out`` (None: in memory)."""
    return make_options(s.request.options, out=out)


def run_tune(s: TuneSettings, *, resume: bool = False, force: bool = False,
             log: Callable[[str], None] = lambda m: None,
             on_trial: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None) -> TuneResult:
    """Run (or resume) the search; ``on_trial(row, best_so_far)`` after every trial (progress display)."""
    from mergekit_lora.formats import load_adapter
    from mergekit_lora.pipeline import resolve_device
    from mergekit_lora.registry import get_algorithm

    if s.budget < 1 or s.workers < 1:
        raise LoraMergeError("budget and workers must be at least 1")
    obj, root = load_objective(s.objective)
    req = s.request
    if not s.use_ray:
        resolve_device(req.options.device)  # cuda without CUDA: one clear error before anything loads
    algo = get_algorithm(req.method)
    opts = merge_options(s)
    adapters = [load_adapter(src, allow_pickle=opts.allow_pickle) for src in req.sources]  # headers only
    weight_count(req.weights, len(adapters))
    space = build_space(algo, s.search, len(adapters), pooled_rank=pooled_rank(adapters), ranges=s.ranges,
                        fixed=s.params, weights=req.weights)
    start = {"params": {**s.params, **{d.name: d.init for d in space.dims}}, "weights": list(space.fixed_weights)
             if not space.n_weights else list(space.init_weights)}
    first, scale = split_scale(start["params"])
    core.make_plan(req.replace(params=first, weights=start["weights"],  # every check, before any trial
                               options=opts if scale is None else make_options(opts, scale=scale)))

    out = Path(s.out)
    path = out / "trials.jsonl"
    header, done = read_trials(path)
    if header is not None or done:
        if force:
            shutil.rmtree(out)
            header, done = None, []
        elif not resume:
            raise LoraMergeError(f"{path} exists; pass resume to continue that search or force to start over")
        elif header != s.header():
            raise LoraMergeError(f"{path} was recorded with other settings; resume needs the same inputs, method, "
                                 "search, objective, budget, workers, optimizer and seed (or use force)")
    out.mkdir(parents=True, exist_ok=True)
    done = done[: s.budget]
    rewrite(path, s.header(), done)
    if done:
        log(f"resuming: {len(done)} of {s.budget} trials recorded")

    opt = make_optimizer(s.optimizer, space, seed=opts.seed, budget=s.budget, workers=s.workers)
    ev_args = (obj, str(root), list(req.sources), req.method, start)
    ev_kwargs = {"options": opts}
    pool = _make_pool(s, ev_args, ev_kwargs) if len(done) < s.budget else None
    rows: list[dict[str, Any]] = []
    worst: list[float] = []

    def told(token: Any, row: dict[str, Any]) -> None:
        sc = row["score"]
        if sc is not None:
            worst[:] = [max([*worst, sc])]
        opt.tell(token, sc if sc is not None else (worst[0] if worst else 0.0) + 1.0)  # failed: worse than any seen

    try:
        i = 0
        while i < s.budget:
            k = min(s.workers, s.budget - i)
            asked = [opt.ask() for _ in range(k)]
            trials = [{"trial": i + j, **space.candidate(v)} for j, (_, v) in enumerate(asked)]
            fresh = []
            for t in trials:
                if t["trial"] < len(done):
                    _check_replay(path, t, done[t["trial"]])
                else:
                    fresh.append(t)
            results: dict[int, dict[str, Any]] = {t["trial"]: done[t["trial"]] for t in trials if t["trial"] < len(done)}

            def on_row(row: dict[str, Any], _res: dict[int, dict[str, Any]] = results) -> None:
                append_row(path, row)
                _res[row["trial"]] = row

            if fresh:
                assert pool is not None
                pool.run_batch(fresh, on_row)
            for (token, _), t in zip(asked, trials):
                row = results[t["trial"]]
                rows.append(row)
                told(token, row)
                if on_trial:
                    on_trial(row, _best(rows))
            i += k
    finally:
        if pool is not None:
            pool.close()

    best = _best(rows)
    if best is None:
        raise LoraMergeError(f"all {len(rows)} trials failed; first error: {rows[0]['error']}")
    adapter = _write_best(s, best, rows, out)
    from .plot import plot_convergence

    plot_convergence(rows, out / "tune.png", metric=obj.metric)
    summary = {"best": best, "start": rows[0], "trials": len(rows),
               "errors": sum(r["score"] is None for r in rows), "settings": s.header()}
    (out / "tune.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return TuneResult(best, rows[0], rows, out, adapter)


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if r["score"] is not None]
    return min(ok, key=lambda r: (r["score"], r["trial"])) if ok else None


def _check_replay(path: Path, t: dict[str, Any], rec: dict[str, Any]) -> None:
    same = rec.get("trial") == t["trial"] and len(rec["weights"]) == len(t["weights"]) and all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(rec["weights"], t["weights"])) and all(
        (math.isclose(v, rec["params"].get(k), rel_tol=1e-9) if isinstance(v, float) else v == rec["params"].get(k))
        for k, v in t["params"].items())
    if not same:
        raise LoraMergeError(f"{path}: trial {t['trial']} does not replay (the optimiser asked for other settings); "
                             "the file comes from another search: use force to start over")


class _LocalPool:
    """Trials one after another in this process (``--no-ray``); the model is loaded once."""

    def __init__(self, ev_args: tuple, ev_kwargs: dict[str, Any]) -> None:
        from .evaluator import Evaluator

        self.ev = Evaluator(*ev_args, **ev_kwargs)

    def run_batch(self, trials, on_row) -> None:
        for t in trials:
            on_row(self.ev.run(t))

    def close(self) -> None:
        pass


def _make_pool(s: TuneSettings, ev_args: tuple, ev_kwargs: dict[str, Any]):
    if not s.use_ray:
        return _LocalPool(ev_args, ev_kwargs)
    from mergekit_lora.distributed.actors import RayTrialPool

    from .evaluator import Evaluator

    device = s.request.options.device
    if str(device).startswith("cuda") and not s.ray_address:
        import os

        import torch

        if not os.environ.get("RAY_ADDRESS") and not torch.cuda.is_available():
            raise LoraMergeError("device cuda was requested but CUDA is not available on this machine; use device cpu")
    return RayTrialPool(Evaluator, s.workers, ev_args, ev_kwargs, address=s.ray_address, device=device)


def _write_best(s: TuneSettings, best: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> Path:
    """The best trial merged and written like ``merge`` (card with the search summary, recipe.yaml)."""
    from mergekit_lora.pipeline import execute, plan
    from mergekit_lora.recipe import recipe_yaml

    dest = out / "best"
    params, scale = split_scale({**s.params, **best["params"]})
    opts = make_options(merge_options(s, dest), force=True, **({"scale": scale} if scale else {}))
    request = s.request.replace(params=params, weights=best["weights"], options=opts)
    request = request.replace(recipe=recipe_yaml(request))
    start = rows[0]
    fmt = lambda v: "failed" if v is None else f"{v:.6g}"  # noqa: E731
    summary = "\n".join([
        f"- searched: {', '.join(s.search)} with {s.optimizer} (seed {opts.seed}), {len(rows)} trials, "
        f"{s.workers} worker(s); objective `{Path(s.objective).name}`",
        f"- best: trial {best['trial']}, objective {fmt(best['score'])} (metric {fmt(best['metric'])})",
        f"- start (untuned settings, trial 0): objective {fmt(start['score'])}",
        f"- failed trials: {sum(r['score'] is None for r in rows)}",
        "- every trial is in `trials.jsonl` next to this folder; `recipe.yaml` reproduces this adapter",
    ])
    p = plan(request)
    execute(replace(p, card_sections=(("Tuned with loramerge tune", summary),)))  # written inside the atomic swap
    return dest
