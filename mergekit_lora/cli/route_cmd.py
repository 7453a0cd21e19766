"""``loramerge route``: a thin caller of :func:`mergekit_lora.routing.route` (the pipeline plus calibration)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_lora.algorithms.params import RouteParams
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions, make_options
from mergekit_lora.request import MergeRequest

from .common import console, emit, err_console, parse_floats, user_errors
from .firstrun import preflight
from .options import EmitRecipeOpt, with_options, with_params


@user_errors
@with_options("seed", "scale", "missing", "device", "dtype", "output_format", "force", "allow_pickle",
              "ignore_modules_to_save", "threads")
@with_params(RouteParams)
def route(
    sources: Annotated[list[str], typer.Argument(metavar="ADAPTER", help="input adapters: folders, .safetensors files, Hub ids")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (a routed adapter)")] = ...,  # type: ignore[assignment]
    weights: Annotated[str | None, typer.Option(help="one weight per input, comma-separated: 1,0.5")] = None,
    calibrate: Annotated[Path | None, typer.Option(help="JSONL calibration data: {\"input_ids\": [...]} or "
                                                        "{\"text\": ...} per line (optional \"labels\")")] = None,
    base: Annotated[Path | None, typer.Option(help="base model folder (transformers) for --calibrate")] = None,
    steps: Annotated[int, typer.Option(help="calibration steps")] = 200,
    lr: Annotated[float, typer.Option(help="calibration learning rate (Adam)")] = 1e-2,
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    max_length: Annotated[int, typer.Option(help="truncate calibration examples to this many tokens")] = 128,
    balance: Annotated[float, typer.Option(help="weight of the load-balancing term (gate router)")] = 0.01,
    bias_rate: Annotated[float, typer.Option(help="step of the selection-bias balancing rule")] = 1e-3,
    export_static: Annotated[bool, typer.Option(help="also write OUT/static: the expected-activation static merge "
                                                     "as a PEFT adapter (needs --calibrate)")] = False,
    profile_data: Annotated[list[Path] | None, typer.Option(
        help="hierarchical: unlabeled JSONL examples of one adapter's domain; repeat once per input, in input "
             "order")] = None,
    profile_old: Annotated[list[Path] | None, typer.Option(
        "--profile", hidden=True, help="deprecated spelling of --profile-data")] = None,
    emit_recipe: EmitRecipeOpt = None,
    *,
    params: dict[str, Any],
    options: MergeOptions,
) -> None:
    """Pool the rank units of all inputs and route over them per token (FlyLoRA / SMoRA style)."""
    if profile_old:  # --profile is the PEFT output profile everywhere else: one meaning per option name
        err_console.print("[bold yellow]warning:[/] route --profile is deprecated (elsewhere --profile is the PEFT "
                          "output profile); use --profile-data", highlight=False, soft_wrap=True)
    profile = [*(profile_data or []), *(profile_old or [])] or None
    request = MergeRequest(sources=sources, method="route", params=params, weights=parse_floats(weights),
                           options=make_options(options, out=out))
    preflight(request)  # before torch
    from mergekit_lora.recipe import recipe_yaml
    from mergekit_lora.routing.api import Calibration
    from mergekit_lora.routing.api import route as run_route

    if emit_recipe is not None:
        if calibrate is not None or profile:
            raise LoraMergeError("--emit-recipe: a recipe holds the training-free routed merge only; drop "
                                 "--calibrate/--profile-data or --emit-recipe")
        emit(recipe_yaml(request), emit_recipe)
    fit = Calibration(base=base, calibrate_data=calibrate, profiles=profile, steps=steps, lr=lr, batch_size=batch_size,
                      max_length=max_length, balance=balance, bias_rate=bias_rate, export_static=export_static)
    res = run_route(request.sources, out, params, request.weights, fit, make_options(request.options, progress=True))
    say = err_console if emit_recipe == "-" else console
    if res.calibration is not None:
        c = res.calibration
        say.print(f"calibration: loss {c.loss_before:.4f} -> {c.loss_after:.4f} ({c.steps} steps)")
    top_k = params.get("top_k")
    say.print(f"[green]wrote[/] {out} ({res.modules} modules, {res.units} units, router "
              f"{params.get('router', 'implicit')}, top-k {top_k if top_k is not None else 'r/2'}, {res.seconds:.2f} s)")
