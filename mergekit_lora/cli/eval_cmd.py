"""``loramerge eval fidelity|tasks|compare|report``: thin layers over :mod:`mergekit_lora.evals`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from mergekit_lora.errors import LoraMergeError

from .common import console, err_console, parse_floats, user_errors

eval_app = typer.Typer(help="Evaluate merged adapters: fidelity (no model), tasks (with a model), method comparison.",
                       no_args_is_help=True)


@eval_app.command()
@user_errors
def fidelity(
    merged: Annotated[str, typer.Argument(help="the merged adapter")],
    against: Annotated[list[str], typer.Option("--against", help="an input adapter (repeat, in merge order)")],
    weights: Annotated[str | None, typer.Option(help="the merge weights, comma-separated (default: 1 each)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (with every module)")] = False,
    plot: Annotated[Path | None, typer.Option(help="also write a PNG: error and energy per layer and module type")] = None,
) -> None:
    """How faithfully MERGED reproduces Σ wᵢ ΔWᵢ of its inputs (factor space, no model needed)."""
    from mergekit_lora.sources import check_sources

    check_sources([merged, *against])  # before torch
    from mergekit_lora.evals.fidelity import fidelity_report

    rep = fidelity_report(merged, against, parse_floats(weights))
    if plot is not None:
        from mergekit_lora.evals.fidelity_plot import plot_fidelity

        plot_fidelity(rep, plot)
        err_console.print(f"wrote {plot}", style="dim")
    if as_json:
        typer.echo(json.dumps(rep.as_dict(), indent=2))
        return
    o = rep.overall
    t = Table(title=f"fidelity of {merged} vs Σ wᵢ ΔWᵢ", title_justify="left")
    for c in ("module group", "modules", "rel. error", "energy"):
        t.add_column(c, justify="left" if c == "module group" else "right")
    for g, v in rep.groups.items():
        t.add_row(g, str(v["modules"]), f"{v['rel_error']:.3e}", f"{v['energy_ratio']:.4f}")
    t.add_row("overall", str(o["modules"]), f"{o['rel_error']:.3e}", f"{o['energy']:.4f}", style="bold")
    console.print(t)
    r = Table(title=f"retention per input (mean effective rank of the merge: {o['effective_rank']:.2f})",
              title_justify="left")
    for c in ("input", "weight", "cos to ΔWᵢ", "projection ⟨·,ΔWᵢ⟩/‖ΔWᵢ‖²"):
        r.add_column(c, justify="left" if c == "input" else "right")
    for name, w, c, p in zip(rep.inputs, rep.weights, o["cos"], o["projection"]):
        r.add_row(name, f"{w:g}", f"{c:.4f}", f"{p:.4f}")
    console.print(r)


def _parse_adapters(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise LoraMergeError(f"--adapter takes NAME=PATH (got {item!r})")
        name, path = item.split("=", 1)
        if name in out or name == "base":
            raise LoraMergeError(f"--adapter name {name!r} is used twice or reserved; choose distinct names")
        out[name] = path
    return out


def _print_matrix(matrix: dict, tasks: list[str], own: dict[str, str]) -> None:
    from mergekit_lora.evals.tasks import normalized_accuracy

    t = Table(title="accuracy (loss)", title_justify="left")
    t.add_column("variant")
    for task in tasks:
        t.add_column(task, justify="right")
    t.add_column("norm. acc", justify="right")
    for variant, scores in matrix.items():
        na = normalized_accuracy(matrix, variant, own)
        t.add_row(variant, *(f"{scores[k]['accuracy']:.3f} ({scores[k]['loss']:.2f})" for k in tasks),
                  "–" if na is None else f"{na:.3f}")
    console.print(t)


@eval_app.command()
@user_errors
def tasks(
    base: Annotated[str, typer.Option(help="base model: 'smollm2-135m' (packaged) or a transformers folder")],
    adapter: Annotated[list[str] | None, typer.Option(help="NAME=PATH (repeat); NAME = a task marks its own adapter")] = None,
    task: Annotated[list[str] | None, typer.Option(help="suite task (repeat); default: all")] = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="test examples per task")] = 100,
    batch_size: Annotated[int, typer.Option(help="examples per forward pass")] = 16,
    max_text_tokens: Annotated[int, typer.Option(help="text truncated to this many tokens")] = 64,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Accuracy and loss of the base model and each adapter on each task (the matrix)."""
    from mergekit_lora.evals.suite.data import TASKS, get_task
    from mergekit_lora.evals.tasks import evaluate_matrix, load_base
    from mergekit_lora.pipeline import resolve_device

    names = task or list(TASKS)
    for n in names:
        get_task(n)
    if examples < 1:
        raise LoraMergeError("--examples must be at least 1")
    adapters = _parse_adapters(adapter)
    for n, p in adapters.items():
        if not Path(p).exists():
            raise LoraMergeError(f"--adapter {n}={p}: no such folder")
    dev = resolve_device(device)
    model, tok = load_base(base, dev)
    matrix = evaluate_matrix(model, tok, adapters, names, examples=examples, batch_size=batch_size, device=dev,
                             max_text_tokens=max_text_tokens,
                             progress=lambda v: err_console.print(f"evaluating {v} on {dev}", style="dim"))
    own = {t: t for t in names if t in adapters}
    if as_json:
        typer.echo(json.dumps({"device": str(dev), "matrix": matrix, "own": own}, indent=2))
        return
    _print_matrix(matrix, names, own)


@eval_app.command()
@user_errors
def compare(
    config: Annotated[Path, typer.Argument(help="YAML/JSON config: base, adapters, tasks, methods, params, weights")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder (report.md, report.png, report.json)")],
    force: Annotated[bool, typer.Option(help="replace an existing report folder")] = False,
    device: Annotated[str | None, typer.Option(help="override the config's device: auto|cpu|cuda")] = None,
    examples: Annotated[int | None, typer.Option("--examples", "-n", help="override examples per task")] = None,
) -> None:
    """Merge the same inputs with every method, evaluate fidelity and tasks, write a report."""
    from mergekit_lora.evals.compare import load_config, run_compare

    cfg, root = load_config(config)
    updates = {k: v for k, v in {"device": device, "examples": examples}.items() if v is not None}
    if updates:
        cfg = type(cfg).model_validate({**cfg.model_dump(), **updates})  # validated, unlike model_copy
    report = run_compare(cfg, root, out, force=force, log=lambda m: err_console.print(m, style="dim"))
    _print_report(report, out)


@eval_app.command()
@user_errors
def report(
    report_json: Annotated[Path, typer.Argument(help="a report.json written by `eval compare`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder to write")],
    force: Annotated[bool, typer.Option(help="replace an existing report folder")] = False,
) -> None:
    """Recompute the intervals of a saved report.json and write the report again (no model needed)."""
    from mergekit_lora.evals.compare import rerender

    _print_report(rerender(report_json, out, force=force), out)


def _print_report(report: dict, out: Path) -> None:
    from mergekit_lora.evals.report_text import console_table, verdict

    head, rows = console_table(report)  # fits 80 columns; the full table is in report.md / report.html
    t = Table(title=f"method comparison ({report['device']})", title_justify="left", box=box.SIMPLE, padding=(0, 1),
              show_edge=False, pad_edge=False)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i > 0)
    for r in rows:
        t.add_row(*r)
    console.print(t)
    console.print(f"[green]wrote[/] {out}/report.md (.html, .png, .json; per-task accuracy there)")
    console.print(verdict(report), highlight=False, soft_wrap=True)
