"""``loramerge export IN --format gguf --base-gguf MODEL.gguf -o OUT``: convert an adapter for a runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import console, user_errors

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


@user_errors
def export(
    source: Annotated[str, typer.Argument(metavar="ADAPTER", help="adapter folder, file or Hub id")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output file (.gguf)")],
    fmt: Annotated[str, typer.Option("--format", help="target format: gguf (llama.cpp / Ollama)")] = "gguf",
    base_gguf: Annotated[Path | None, typer.Option(
        help="the base model's .gguf: its architecture, tensor names and shapes are read and checked")] = None,
    architecture: Annotated[str | None, typer.Option(
        help="llama.cpp architecture when no base GGUF is given (llama, qwen2, qwen3)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    force: Annotated[bool, typer.Option(help="replace an existing output")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="read .bin/.pt pickle files (only if you trust them)")] = False,
    static: Annotated[str | None, typer.Option(
        help="a routed adapter has no static form; 'cat' exports all its units at once (routing dropped)")] = None,
) -> None:
    """Convert an adapter into another runtime's format (today: a llama.cpp LoRA GGUF)."""
    import torch

    from mergekit_lora.errors import LoraMergeError
    from mergekit_lora.formats import load_adapter
    from mergekit_lora.formats.gguf import GGUFOptions
    from mergekit_lora.pipeline.output import export as export_file

    if fmt != "gguf":
        raise LoraMergeError(f"export format {fmt!r} is not supported; available: gguf")
    if dtype not in _DTYPES:
        raise LoraMergeError(f"dtype {dtype!r} is not supported for GGUF; use float32, float16 or bfloat16")
    if static not in (None, "cat"):
        raise LoraMergeError(f"--static {static!r}: the one static form of a routed adapter is 'cat' (all units at "
                             "once); for a smaller one merge the inputs: loramerge merge INPUTS -m svd --rank K")
    adapter = load_adapter(source, allow_pickle=allow_pickle)
    if adapter.meta.format == "routed" and static is None:
        raise LoraMergeError(f"{source} is a routed adapter: GGUF runtimes cannot route, so exporting it would drop "
                             "the routing; pass --static cat to export every unit at once (the cat merge), or "
                             "export one of its inputs")
    info = export_file(adapter, out, "gguf", GGUFOptions(base_gguf, architecture), dtype=getattr(torch, _DTYPES[dtype]),
                       force=force)
    console.print(f"[green]wrote[/] {out}: {info['modules']} LoRA modules for {info['architecture']}, "
                  f"alpha {info['lora_alpha']:g}, {info['dtype']}")
