"""``loramerge run recipe.yaml [--dry-run]``: validate, resolve, print the plan or merge."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from .common import console, user_errors
from .firstrun import warn_inputs, warn_result
from .report import print_fidelity

if TYPE_CHECKING:
    from mergekit_lora.pipeline import MergePlan
    from mergekit_lora.recipe import Recipe


def _params_text(params: object) -> str:
    dumped = params.model_dump()  # type: ignore[attr-defined]
    return ", ".join(f"{k}={v}" for k, v in dumped.items()) or "-"


def print_plan(r: Recipe, p: MergePlan) -> None:
    """The plan: inputs (with resolved revisions), then per module params, weights, override."""
    inputs = Table(title=f"inputs ({r.method})", title_justify="left")
    for c in ("#", "source", "revision", "base model", "modules", "rank"):
        inputs.add_column(c)
    for i, (spec, a) in enumerate(zip(r.adapters, p.adapters)):
        ranks = sorted({m.rank for m in a.modules.values()})
        rev = a.meta.extra.get("resolved_revision") or a.meta.revision or "-"
        inputs.add_row(str(i), spec.source, str(rev), str(a.meta.base_model or "-"), str(len(a)),
                       str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}")
    console.print(inputs)
    if r.modules:
        ov = Table(title="overrides (first match wins)", title_justify="left")
        for c in ("#", "match", "modules matched"):
            ov.add_column(c)
        for i, o in enumerate(r.modules):
            ov.add_row(f"modules[{i}]", o.match, str(p.matched.get(i, 0)))
        console.print(ov)
    t = Table(title=f"modules ({len(p.modules)})", title_justify="left")
    longest = max((len(m.name) for m in p.modules), default=6)
    t.add_column("module", no_wrap=True, min_width=longest)  # whole module names; the other columns wrap
    for c in ("layer t", "parameters", "weights", "override"):
        t.add_column(c, overflow="fold")
    for row in p.modules:
        t.add_row(row.name, "-" if row.layer is None else f"{row.t:.3g}", _params_text(row.params),
                  ", ".join(f"{w:g}" for w in row.weights),
                  "-" if row.override is None else f"modules[{row.override}]")
    console.print(t)
    out = r.output
    dest = f"{out.path} ({out.format or 'input format'}, {out.dtype or 'input dtype'})"
    if Path(out.path).exists():
        dest += " [yellow](exists: running needs --force)[/]"
    if out.push_to_hub:
        dest += f" → push to {out.push_to_hub}" + (" (private)" if out.private else "")
    console.print(f"output: {dest}; seed {r.seed}; missing modules: {r.missing}")


@user_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="a YAML merge recipe")],
    dry_run: Annotated[bool, typer.Option(help="validate and print the resolved plan; merge nothing")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing output")] = False,
) -> None:
    """Run a YAML merge recipe (validated up front: every problem is listed with its line)."""
    from mergekit_lora.recipe import read_recipe_text, validate_recipe

    validate_recipe(read_recipe_text(recipe), str(recipe), force=force or dry_run, check_token=not dry_run)  # no torch
    from mergekit_lora.pipeline import (  # the core loads when a command runs (start-up time)
        execute,
        make_options,
        plan_recipe,
    )

    r, p = plan_recipe(recipe, force=force or dry_run, check_token=not dry_run)
    if dry_run:
        print_plan(r, p)
        console.print("[yellow]dry run:[/] nothing was merged or written")
        return
    warn_inputs(p)
    result = execute(replace(p, options=make_options(p.options, progress=True)))
    print_fidelity(result.fidelity)
    out = r.output
    console.print(f"[green]wrote[/] {out.path} ({result.modules} modules, {result.seconds:.2f} s)")
    warn_result(result.report)
    if out.push_to_hub:
        console.print(f"[green]pushed[/] to {out.push_to_hub}")
