"""``loramerge tune``: a thin layer over :func:`mergekit_lora.tune.search.run_tune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions
from mergekit_lora.request import MergeRequest

from .common import console, err_console, parse_floats, parse_kv, user_errors
from .options import with_options


@user_errors
@with_options("seed", "scale", "missing", "device", "dtype", "output_format", "allow_pickle")
def tune(
    sources: Annotated[list[str], typer.Argument(help="input adapters: folders, .safetensors files")],
    objective: Annotated[Path, typer.Option(help="objective YAML: base model, few-shot tasks, metric, l1")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: best/, trials.jsonl, tune.png, tune.json")],
    method: Annotated[str, typer.Option("--method", "-m", help="merge method (see `loramerge methods`)")] = "linear",
    search: Annotated[str, typer.Option(help="what to search, comma-separated: weights and/or parameter names")] = "weights",
    budget: Annotated[int, typer.Option(help="number of trials")] = 32,
    optimizer: Annotated[str, typer.Option(help="nevergrad (CMA-ES), nevergrad:NAME (e.g. TwoPointsDE) or optuna (TPE)")] = "nevergrad",
    workers: Annotated[int, typer.Option(help="trials evaluated in parallel (one ask/tell batch)")] = 1,
    use_ray: Annotated[bool, typer.Option("--ray/--no-ray", help="trials on Ray actors (default) or in this process")] = True,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")] = None,
    weights: Annotated[str | None, typer.Option(help="start weights (fixed when weights are not searched)")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="fixed parameter (start value if searched): key=value")] = None,
    range_: Annotated[list[str] | None, typer.Option("--range", help="bounds of a searched parameter: NAME=LO:HI")] = None,
    resume: Annotated[bool, typer.Option(help="continue the search recorded in OUT/trials.jsonl")] = False,
    force: Annotated[bool, typer.Option(help="discard an existing search in OUT")] = False,
    *,
    options: MergeOptions,
) -> None:
    """Search METHOD's parameters and per-adapter weights against an objective; write the best merge."""
    from mergekit_lora.tune.search import TuneSettings, run_tune
    from mergekit_lora.tune.space import parse_ranges

    if resume and force:
        raise LoraMergeError("--resume and --force exclude each other")
    request = MergeRequest(sources=list(sources), method=method, params=parse_kv(param),
                           weights=parse_floats(weights), options=options)
    s = TuneSettings(request=request, objective=str(objective), out=str(out),
                     search=[x.strip() for x in search.split(",") if x.strip()], budget=budget, optimizer=optimizer,
                     workers=workers, use_ray=use_ray, ray_address=ray_address, ranges=parse_ranges(range_))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[best]}"), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task(f"tuning {method}", total=budget, best="")

        def on_trial(row: dict, best: dict | None) -> None:
            bar.update(task, advance=1, best="" if best is None else f"best {best['score']:.4f} (trial {best['trial']})")

        result = run_tune(s, resume=resume, force=force, log=lambda m: err_console.print(m, style="dim"),
                          on_trial=on_trial)
    _table(result.rows)
    b, st = result.best, result.start
    start = "failed" if st["score"] is None else f"{st['score']:.4f}"
    console.print(f"best trial {b['trial']}: objective {b['score']:.4f} (start {start}); "
                  f"[green]wrote[/] {result.adapter}, {out}/trials.jsonl, {out}/tune.png")


def _table(rows: list[dict], top: int = 10) -> None:
    ok = sorted((r for r in rows if r["score"] is not None), key=lambda r: (r["score"], r["trial"]))[:top]
    t = Table(title=f"best {len(ok)} of {len(rows)} trials ({sum(r['score'] is None for r in rows)} failed)",
              title_justify="left")
    for c in ("trial", "objective", "metric", "weights", "params", "s", "worker"):
        t.add_column(c, justify="left" if c in ("weights", "params", "worker") else "right")
    for r in ok:
        t.add_row(str(r["trial"]), f"{r['score']:.4f}", f"{r['metric']:.4f}", ",".join(f"{w:.2f}" for w in r["weights"]),
                  " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()),
                  f"{r['seconds']:.1f}", str(r["worker"]))
    console.print(t)
