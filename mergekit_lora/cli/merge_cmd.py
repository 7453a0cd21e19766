"""``loramerge merge``: a thin caller of the pipeline (plan, then execute)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions, make_options
from mergekit_lora.request import MergeRequest

from .common import console, emit, err_console, parse_floats, parse_kv, user_errors
from .firstrun import default_out, preflight, warn_inputs, warn_result
from .options import WRITE_OPTIONS, EmitRecipeOpt, with_options
from .ray_opts import RayAddressOpt, RayOpt, RayWorkersOpt, ray_options
from .report import print_fidelity

# Shortcut flags -> parameter names; passed only when set, and only to a method that takes them.
SHORTCUTS = ("rank", "density", "lambda_")


def collect_params(method: str, shortcuts: dict[str, Any], extra: list[str] | None) -> dict[str, Any]:
    """Merge shortcut flags and ``-p key=value`` into one dict, refusing parameters the method lacks."""
    from mergekit_lora.registry import available

    params = parse_kv(extra)
    algo = available().get(method)
    for key, value in shortcuts.items():
        if value is None:
            continue
        if algo is not None and key not in algo.Params.model_fields:
            shown = "--lambda" if key == "lambda_" else f"--{key}"
            raise LoraMergeError(f"method {method!r} does not take {shown}; see `loramerge methods`")
        params[key] = value
    return params


def run_and_report(request: MergeRequest, emit_recipe: str | None, ray: Any = None) -> Path:
    """Plan (every check), emit the recipe if asked, execute, print the fidelity table (shared with cluster).

    Without ``-o`` (``options.out`` None) the output is a new folder named from the method and inputs;
    returns the output folder."""
    options = request.options
    chosen = options.out is None
    if chosen:
        request = request.with_options(out=default_out(request.method, [str(s) for s in request.sources],
                                                       options.force))
        options = request.options
    preflight(request)  # before torch: typos in < 0.5 s
    from mergekit_lora.pipeline import execute, plan
    from mergekit_lora.recipe import recipe_yaml

    recipe = recipe_yaml(request)
    p = plan(request.replace(recipe=recipe, options=make_options(options, progress=True)))
    emit(recipe, emit_recipe)
    out = err_console if emit_recipe == "-" else console  # stdout holds the YAML alone then
    if chosen:
        out.print(f"no -o given: writing to ./{escape(str(options.out))}/", highlight=False)
    warn_inputs(p)
    stream_fn = None
    if ray is not None:  # only then: Ray's driver imports torch, which linear/cat do not need
        from mergekit_lora.distributed.ray_merge import ray_stream

        stream_fn = ray_stream(ray)
    result = execute(p, stream_fn)
    print_fidelity(result.fidelity, out)
    for k, v in result.report.items():
        if k != "warning":
            out.print(f"{k}: {v:.3e}" if isinstance(v, float) else f"{k}: {v}")
    out.print(f"[green]wrote[/] {options.out} ({result.modules} modules, {result.seconds:.2f} s)")
    warn_result(result.report)  # last, on stderr, where it is not missed
    return Path(options.out)


@user_errors
@with_options(*WRITE_OPTIONS)
def merge(
    sources: Annotated[list[str], typer.Argument(metavar="ADAPTER", help="input adapters: folders, .safetensors files, Hub ids")],
    method: Annotated[str, typer.Option("--method", "-m", help="merge method (see `loramerge methods`)")] = "linear",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: a new folder "
                                                                "METHOD-INPUTS here)")] = None,
    weights: Annotated[str | None, typer.Option(help="one weight per input, comma-separated: 1,0.5")] = None,
    rank: Annotated[int | None, typer.Option(help="output rank (methods that re-rank)")] = None,
    density: Annotated[float | None, typer.Option(
        help="fraction of entries kept (ties, dare, magnitude_prune: of each ΔW, or of the R×R core with "
             "-p space=core; knots_*: of the k×n task blocks)")] = None,
    lambda_: Annotated[float | None, typer.Option("--lambda", help="scale of the merged update (ties)")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="any method parameter: key=value")] = None,
    emit_recipe: EmitRecipeOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    *,
    options: MergeOptions,
) -> None:
    """Merge adapters into one LoRA with METHOD (exact on rank units, streamed module by module)."""
    params = collect_params(method, {"rank": rank, "density": density, "lambda_": lambda_}, param)
    request = MergeRequest(sources=sources, method=method, params=params, weights=parse_floats(weights),
                           options=make_options(options, out=out))
    run_and_report(request, emit_recipe, ray_options(ray, ray_address, ray_workers))
