"""``loramerge cluster``: LoRA-LEGO, a thin caller of the pipeline with ``method="lego"``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mergekit_lora.algorithms.lego.params import LegoParams
from mergekit_lora.options import MergeOptions, make_options
from mergekit_lora.request import MergeRequest

from .common import console, err_console, parse_floats, user_errors
from .merge_cmd import run_and_report
from .options import WRITE_OPTIONS, EmitRecipeOpt, with_options, with_params
from .ray_opts import RayAddressOpt, RayOpt, RayWorkersOpt, ray_options


@user_errors
@with_options(*WRITE_OPTIONS)
@with_params(LegoParams)
def cluster(
    sources: Annotated[list[str], typer.Argument(metavar="ADAPTER", help="input adapters: folders, .safetensors files, Hub ids")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: a new folder "
                                                                "lego-INPUTS here)")] = None,
    weights: Annotated[str | None, typer.Option(help="one weight per input, comma-separated: 1,0.5")] = None,
    emit_recipe: EmitRecipeOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    *,
    params: dict[str, Any],
    options: MergeOptions,
) -> None:
    """Merge adapters with LoRA-LEGO: k-means over all rank units, centroids form a rank-k LoRA.

    Unset options take the method's defaults (`loramerge methods` lists them).
    """
    request = MergeRequest(sources=sources, method="lego", params=params, weights=parse_floats(weights),
                           options=make_options(options, out=out))
    written = run_and_report(request, emit_recipe, ray_options(ray, ray_address, ray_workers))
    if params.get("report"):
        (err_console if emit_recipe == "-" else console).print(
            f"cluster report: {written / 'lego_report.md'} (and lego_report.json, lego_report.png)")
