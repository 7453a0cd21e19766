"""``loramerge cluster``: LoRA-LEGO, a thin caller of the pipeline with ``method="lego"``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_lora.options import MergeOptions, make_options

from .common import console, err_console, parse_floats, user_errors
from .firstrun import default_out
from .merge_cmd import run_and_report
from .options import WRITE_OPTIONS, EmitRecipeOpt, with_options
from .ray_opts import RayAddressOpt, RayOpt, RayWorkersOpt, ray_options


@user_errors
@with_options(*WRITE_OPTIONS)
def cluster(
    sources: Annotated[list[str], typer.Argument(metavar="ADAPTER", help="input adapters: folders, .safetensors files, Hub ids")],
    k: Annotated[int | None, typer.Option("-k", "--k", help="clusters per module = merged rank (default: the inputs' largest rank)")] = None,
    k_ratio: Annotated[float | None, typer.Option(help="k as a fraction of the pooled rank (instead of -k)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: a new folder "
                                                                "lego-INPUTS here)")] = None,
    weights: Annotated[str | None, typer.Option(help="one weight per input, comma-separated: 1,0.5")] = None,
    features: Annotated[str | None, typer.Option(help="paper ([a/‖a‖; b/‖b‖] features, raw centroids: the published "
                                                        "method) | canonical | raw")] = None,
    reweight: Annotated[str | None, typer.Option(help="paper (dual reweighting) | lsq | none")] = None,
    space: Annotated[str | None, typer.Option(help="cluster the whole vector (concat) or its a / b part")] = None,
    signs: Annotated[str | None, typer.Option(help="invariant | rule | none (by default what the features need)")] = None,
    balance_inputs: Annotated[bool | None, typer.Option(help="every input in a cluster counts once in its mean")] = None,
    backend: Annotated[str | None, typer.Option(help="k-means backend: auto|torch|faiss|sklearn")] = None,
    n_init: Annotated[int | None, typer.Option(help="k-means restarts")] = None,
    max_iter: Annotated[int | None, typer.Option(help="Lloyd iterations at most")] = None,
    report: Annotated[bool, typer.Option(help="write lego_report.json/.md/.png (who clusters with whom) into the output")] = False,
    emit_recipe: EmitRecipeOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    *,
    options: MergeOptions,
) -> None:
    """Merge adapters with LoRA-LEGO: k-means over all rank units, centroids form a rank-k LoRA.

    Unset options take the method's defaults (`loramerge methods` lists them).
    """
    # Only what was given: the defaults are LegoParams' own (one source of truth).
    given = {"k": k, "k_ratio": k_ratio, "features": features, "reweight": reweight, "space": space, "signs": signs,
             "balance_inputs": balance_inputs, "backend": backend, "n_init": n_init, "max_iter": max_iter,
             "report": report or None}
    params = {key: v for key, v in given.items() if v is not None}
    options = make_options(options, out=out or default_out("lego", sources, options.force))
    run_and_report(sources, "lego", params, parse_floats(weights), options, emit_recipe,
                   ray_options(ray, ray_address, ray_workers), chosen=out is None)
    if report:
        (err_console if emit_recipe == "-" else console).print(
            f"cluster report: {options.out / 'lego_report.md'} (and lego_report.json, lego_report.png)")
