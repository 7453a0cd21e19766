"""``loramerge cluster``: LoRA-LEGO, a thin layer over ``merge(..., method="lego")``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_lora.merge import merge as run_merge
from mergekit_lora.recipe import recipe_from_cli

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
    user_errors,
)
from .merge_cmd import emit
from .ray_opts import RayAddressOpt, RayOpt, RayWorkersOpt, ray_options
from .report import print_fidelity


@user_errors
def cluster(
    sources: Annotated[list[str], typer.Argument(help="input adapters: folders, .safetensors files")],
    k: Annotated[int | None, typer.Option("-k", "--k", help="clusters per module = merged rank")] = None,
    k_ratio: Annotated[float | None, typer.Option(help="k as a fraction of the pooled rank (instead of -k)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = ...,  # type: ignore[assignment]
    weights: Annotated[str | None, typer.Option(help="one weight per input, comma-separated: 1,0.5")] = None,
    backend: Annotated[str, typer.Option(help="k-means backend: auto|torch|faiss|sklearn")] = "auto",
    reweight: Annotated[str, typer.Option(help="paper (dual reweighting) | lsq | none")] = "paper",
    space: Annotated[str, typer.Option(help="cluster [b;a] (concat, the paper), or the a / b part")] = "concat",
    signs: Annotated[str, typer.Option(help="invariant (k-means treats v and -v as one unit) | rule (fix signs first)")] = "invariant",
    n_init: Annotated[int, typer.Option(help="k-means restarts")] = 3,
    max_iter: Annotated[int, typer.Option(help="Lloyd iterations at most")] = 100,
    seed: SeedOpt = 0,
    report: Annotated[bool, typer.Option(help="write lego_report.json/.md into the output")] = False,
    missing: MissingOpt = "union",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    output_format: FormatOpt = None,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
    emit_recipe: EmitRecipeOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
) -> None:
    """Merge adapters with LoRA-LEGO: k-means over all rank units, centroids form a rank-k LoRA."""
    params = {"k": k, "k_ratio": k_ratio, "backend": backend, "reweight": reweight, "space": space,
              "signs": signs, "n_init": n_init, "max_iter": max_iter, "report": report}
    w = parse_floats(weights)
    recipe = recipe_from_cli(sources, "lego", out, weights=w, params=params, seed=seed, missing=missing, device=device,
                             dtype=dtype, output_format=output_format, allow_pickle=allow_pickle)
    emit(recipe, emit_recipe)
    result = run_merge(
        sources, "lego", out, weights=w, params=params, missing=missing,  # type: ignore[arg-type]
        device=device, dtype=dtype, seed=seed, force=force, output_format=output_format, progress=True,
        load_options={"allow_pickle": allow_pickle}, recipe=recipe,
        ray=ray_options(ray, ray_address, ray_workers),
    )
    print_fidelity(result.fidelity)
    if report:
        console.print(f"cluster report: {out / 'lego_report.md'} (and lego_report.json)")
    console.print(f"[green]wrote[/] {out} ({result.modules} modules, {result.seconds:.2f} s)")
