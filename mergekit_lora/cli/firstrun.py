"""What makes the first command work as written (issue 23): a default output folder when ``-o`` is not
given, the torch-free checks of a request (so a typo is one ``error:`` line in a fraction of a second,
before torch is imported), and the warnings a user must not miss.

Example::

    default_out("lego", ["a.safetensors", "b.safetensors"], force=False)  # Path("lego-a-b"), or lego-a-b-2 …
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_lora.errors import LoraMergeError, raise_all
from mergekit_lora.request import MergeRequest

_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")
_STEMS = 3  # inputs named in a default folder; the rest are counted


def _stem(source: str) -> str:
    """``examples/suite/topic`` -> topic, ``a.safetensors`` -> a, ``x/adapter_model.safetensors`` -> x."""
    p = Path(source.split(":alpha=")[0].rstrip("/"))
    name = p.stem if p.suffix in (".safetensors", ".bin", ".pt") else p.name
    if name in ("adapter_model", "pytorch_lora_weights", "lora", "") and p.parent.name:
        name = p.parent.name
    return _UNSAFE.sub("_", name).strip("._") or "adapter"


def default_out(method: str, sources: Sequence[str], force: bool) -> Path:
    """``METHOD-a-b`` in the current folder; an existing path gets ``-2``, ``-3`` … unless ``force``."""
    stems = [_stem(s) for s in sources[:_STEMS]]
    more = [f"and{len(sources) - _STEMS}more"] if len(sources) > _STEMS else []
    base = "-".join([method, *stems, *more])[:120]
    if force or not Path(base).exists():
        return Path(base)
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return Path(f"{base}-{n}")


def preflight(request: MergeRequest) -> None:
    """The request's own checks that need neither torch nor a tensor, with the validators ``plan`` calls
    (so the same messages; ``plan`` repeats them): method (did you mean), its parameters, the weights count,
    local paths (did you mean), the output.  Hub ids are left to ``plan``."""
    from mergekit_lora.checks import check_output, weight_count
    from mergekit_lora.registry import available, field_names, parse_params, unknown_method
    from mergekit_lora.sources import source_problems

    problems: list[LoraMergeError] = []
    algos = available()
    entry = algos.get(request.method)
    if entry is None:
        problems.append(LoraMergeError(unknown_method(request.method, algos), field="method"))
    else:
        try:
            parse_params(entry, field_names(entry, dict(request.params or {})))  # type: ignore[arg-type]
        except LoraMergeError as e:
            problems.append(e)
    sources = [str(s) for s in request.sources]
    if not sources:
        problems.append(LoraMergeError("no input adapters given", field="adapters"))
    try:
        weight_count(request.weights, len(sources))
    except LoraMergeError as e:
        problems.append(e)
    problems += source_problems(sources)
    out = request.options.out
    if out is not None:
        try:
            check_output(out, request.options.force)
        except LoraMergeError as e:
            problems.append(e)
        except OSError:
            pass  # e.g. a name too long for the filesystem: plan() words it (checks.output_path_ok)
    raise_all(problems)


def warn(message: str) -> None:
    """One ``warning: …`` line on stderr (never on stdout: ``--emit-recipe -`` keeps stdout for the YAML)."""
    from rich.markup import escape

    from .common import err_console

    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn_inputs(plan: Any) -> None:
    """Warnings about the inputs of a checked plan: an alpha assumed = r (before the merge starts)."""
    from mergekit_lora.sources import assumed_alpha

    if note := assumed_alpha(plan.labels, plan.adapters):
        warn(note)


def warn_result(report: dict[str, Any]) -> None:
    """The algorithm's own warning (LEGO: k ≥ the pooled rank clusters nothing), printed last."""
    if "warning" in report:
        warn(str(report["warning"]))
