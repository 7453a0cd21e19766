"""``loramerge merge``: a thin layer over :func:`mergekit_lora.merge.merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.merge import merge as run_merge
from mergekit_lora.recipe import recipe_from_cli
from mergekit_lora.registry import get_algorithm

from .common import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    EmitRecipeOpt,
    ForceOpt,
    FormatOpt,
    MissingOpt,
    SeedOpt,
    console,
    parse_floats,
    parse_kv,
    user_errors,
)
from .ray_opts import RayAddressOpt, RayOpt, RayWorkersOpt, ray_options
from .report import print_fidelity

# Shortcut flags -> parameter names; passed only when set, and only to a method that takes them.
SHORTCUTS = ("rank", "density", "lambda_")


def collect_params(method: str, shortcuts: dict[str, Any], extra: list[str] | None) -> dict[str, Any]:
    """Merge shortcut flags and ``-p key=value`` into one dict, refusing parameters the method lacks."""
    algo = get_algorithm(method)
    fields = algo.Params.model_fields
    params = parse_kv(extra)
    for flag, value in shortcuts.items():
        if value is None:
            continue
        key = "lambda_" if flag == "lambda_" else flag
        if key not in fields:
            shown = "--lambda" if flag == "lambda_" else f"--{flag}"
            raise LoraMergeError(f"method {method!r} does not take {shown}; see `loramerge methods`")
        params[key] = value
    return params


def emit(recipe: str, dest: str | None) -> None:
    """``--emit-recipe``: '-' prints the recipe, a path gets it written (before the merge starts)."""
    if dest is None:
        return
    if dest == "-":
        typer.echo(recipe, nl=False)
        return
    try:
        Path(dest).write_text(recipe)
    except OSError as e:
        raise LoraMergeError(f"--emit-recipe {dest}: cannot write the recipe ({e.strerror})") from None


@user_errors
def merge(
    sources: Annotated[list[str], typer.Argument(help="input adapters: folders, .safetensors files")],
    method: Annotated[str, typer.Option("--method", "-m", help="merge method (see `loramerge methods`)")] = "linear",
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = ...,  # type: ignore[assignment]
    weights: Annotated[str | None, typer.Option(help="one weight per input, comma-separated: 1,0.5")] = None,
    rank: Annotated[int | None, typer.Option(help="output rank (methods that re-rank)")] = None,
    density: Annotated[float | None, typer.Option(help="fraction of entries kept (ties, dare, magnitude_prune)")] = None,
    lambda_: Annotated[float | None, typer.Option("--lambda", help="scale of the merged update (ties)")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="any method parameter: key=value")] = None,
    seed: SeedOpt = 0,
    missing: MissingOpt = "union",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    output_format: FormatOpt = None,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
    ignore_modules_to_save: Annotated[bool, typer.Option(help="drop modules_to_save tensors instead of refusing")] = False,
    emit_recipe: EmitRecipeOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
) -> None:
    """Merge adapters into one LoRA with METHOD (exact on rank units, streamed module by module)."""
    params = collect_params(method, {"rank": rank, "density": density, "lambda_": lambda_}, param)
    w = parse_floats(weights)
    recipe = recipe_from_cli(sources, method, out, weights=w, params=params, seed=seed, missing=missing, device=device,
                             dtype=dtype, output_format=output_format, allow_pickle=allow_pickle,
                             ignore_modules_to_save=ignore_modules_to_save)
    emit(recipe, emit_recipe)
    result = run_merge(
        sources, method, out, weights=w, params=params, missing=missing,  # type: ignore[arg-type]
        device=device, dtype=dtype, seed=seed, force=force, output_format=output_format, progress=True,
        load_options={"allow_pickle": allow_pickle, "ignore_modules_to_save": ignore_modules_to_save},
        recipe=recipe, ray=ray_options(ray, ray_address, ray_workers),
    )
    print_fidelity(result.fidelity)
    for k, v in result.report.items():
        console.print(f"{k}: {v:.3e}" if isinstance(v, float) else f"{k}: {v}")
    console.print(f"[green]wrote[/] {out} ({result.modules} modules, {result.seconds:.2f} s)")
