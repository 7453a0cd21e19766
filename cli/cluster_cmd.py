"""``loramerge cluster``: LoRA-LEGO, a thin caller of the pipeline with ``method="lego"``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergekit_lora.options import MergeOptions

from .common import console, parse_floats, user_errors
from .merge_cmd import run_and_report
from .options import WRITE_OPTIONS, EmitRecipeOpt, with_options


@user_errors
@with_options(*WRITE_OPTIONS)
def cluster(
    sources: Annotated[list[str], typer.Argument(help="input adapters: folders, .safetensors files, Hub ids")],
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
    report: Annotated[bool, typer.Option(help="write lego_report.json/.md into the output")] = False,
    emit_recipe: EmitRecipeOpt = None,
    *,
    options: MergeOptions,
) -> None:
    """Merge adapters with LoRA-LEGO: k-means over all rank units, centroids form a rank-k LoRA."""
    params = {"k": k, "k_ratio": k_ratio, "backend": backend, "reweight": reweight, "space": space,
              "signs": signs, "n_init": n_init, "max_iter": max_iter, "report": report}
    run_and_report(sources, "lego", params, parse_floats(weights), options.model_copy(update={"out": out}),
                   emit_recipe)
    if report:
        console.print(f"cluster report: {out / 'lego_report.md'} (and lego_report.json)")
