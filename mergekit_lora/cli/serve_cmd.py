"""``loramerge generate`` and ``loramerge serve``: one generation core (:mod:`mergekit_lora.serving`).

Arguments are checked before torch (or fastapi) is imported: a wrong path or option costs no start-up.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Annotated

import typer

from mergekit_lora.errors import LoraMergeError

from .common import err_console, user_errors

BaseOpt = Annotated[str, typer.Option("--base", help="base model: a transformers folder, or smollm2-135m "
                                                     "(the suite's model, converted once and cached)")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option(help="float32, float16 or bfloat16")]


def _check_base(base: str) -> None:
    from pathlib import Path

    from mergekit_lora.evals.suite.model import SMOLLM2

    if base != SMOLLM2 and not (Path(base) / "config.json").is_file():
        raise LoraMergeError(f"--base {base}: not a transformers model folder (no config.json); give a local "
                             f"folder or {SMOLLM2!r}")


def _quiet() -> None:
    """No per-shard progress bars or deprecation warnings from transformers/PEFT on the user's terminal."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
    if max_tokens < 1:
        raise LoraMergeError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if not 0.0 <= temperature <= 2.0:
        raise LoraMergeError(f"--temperature must be between 0 (greedy) and 2 (got {temperature})")
    if not 0.0 < top_p <= 1.0:
        raise LoraMergeError(f"--top-p must be in (0, 1] (got {top_p})")


@user_errors
def generate(
    args: Annotated[list[str], typer.Argument(metavar="[ADAPTER] PROMPT", help="an adapter (PEFT or routed folder, "
                                              "or a Hub id; leave out for the base model) and the prompt")],
    base: BaseOpt = ...,  # type: ignore[assignment]
    max_tokens: Annotated[int, typer.Option(help="tokens to generate at most")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy; above 0 samples")] = 0.0,
    top_p: Annotated[float, typer.Option(help="sampling: keep the most probable tokens up to this mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed (the same seed gives the same text)")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop before this text (repeatable)")] = None,
    chat: Annotated[bool, typer.Option(help="wrap the prompt as a user message in the tokenizer's chat template")] = False,
    compare: Annotated[bool, typer.Option(help="the base model too: two columns on a terminal, one block after the other in a pipe")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
) -> None:
    """Generate text with a base model and an adapter (PEFT, static merge or routed), streamed to the terminal."""
    from mergekit_lora.serving.sources import BASE, adapter_kind

    if len(args) not in (1, 2):
        raise LoraMergeError(f"give [ADAPTER] PROMPT (got {len(args)} arguments); quote a prompt with spaces")
    adapter, prompt = (args[0], args[1]) if len(args) == 2 else (None, args[0])
    if compare and adapter is None:
        raise LoraMergeError("--compare shows the base model against an adapter: give ADAPTER PROMPT")
    _check_sampling(max_tokens, temperature, top_p)
    _check_base(base)
    if adapter is not None:
        adapter_kind(adapter)
    from mergekit_lora.serving.decode import Sampling
    from mergekit_lora.serving.engine import Engine

    _quiet()
    t0 = time.perf_counter()
    engine = Engine(base, {"adapter": adapter} if adapter else {}, device=device, dtype=dtype)
    ids = engine.encode_chat([{"role": "user", "content": prompt}]) if chat else engine.encode(prompt)
    if not ids:
        raise LoraMergeError("the prompt is empty")
    params = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop or ()))
    err_console.print(f"loaded in {time.perf_counter() - t0:.1f} s on {engine.device}", style="dim", highlight=False,
                      markup=False)
    runs = ([BASE, "adapter"] if compare else ["adapter" if adapter else BASE])
    # --compare on a terminal: two columns once both are done; in a pipe: one labelled block after the other
    columns = compare and sys.stdout.isatty() and shutil.get_terminal_size().columns >= 80
    texts = []
    for name in runs:
        label = "base" if name == BASE else str(adapter)
        if compare and not columns:
            sys.stdout.write(f"{'' if name == BASE else chr(10)}── {label} ──\n")
        t = time.perf_counter()
        row, _used = engine.generate(name, ids, params, on_text=None if columns else _write)
        if not columns:
            _write("\n")
        dt = time.perf_counter() - t
        texts.append((label, row.text))
        err_console.print(f"[{label}: {len(row.tokens)} tokens, {row.finish_reason}, "
                          f"{len(row.tokens) / max(dt, 1e-9):.1f} tok/s]", style="dim", highlight=False, markup=False)
    if columns:
        side_by_side(texts)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def side_by_side(texts: list[tuple[str, str]], console=None) -> None:
    """The answers in columns, one per model, wrapped to the terminal's width."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False, expand=True)
    for label, _ in texts:
        table.add_column(label, ratio=1, overflow="fold")
    table.add_row(*[text for _, text in texts])
    (console or Console()).print(table, highlight=False, markup=False)


@user_errors
def serve(
    base: BaseOpt = ...,  # type: ignore[assignment]
    adapter: Annotated[list[str] | None, typer.Option("--adapter", "-a", help="NAME=PATH (repeatable): a PEFT or "
                                                      "routed adapter folder, or a Hub id; requests name it in 'model'")] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default; anything else needs --api-key)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LORAMERGE_API_KEY",
                                                help="require 'Authorization: Bearer KEY' (or set LORAMERGE_API_KEY)")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    max_tokens_limit: Annotated[int, typer.Option(help="the largest max_tokens a request may ask for")] = 1024,
    max_request_bytes: Annotated[int, typer.Option(help="the largest request body accepted")] = 1_000_000,
    max_batch: Annotated[int, typer.Option(help="requests of one adapter generated together")] = 8,
    batch_window_ms: Annotated[float, typer.Option(help="how long a request waits for others of its adapter")] = 5.0,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level: info, warning, error")] = "info",
) -> None:
    """Serve the base model and adapters with an OpenAI-compatible API (completions, chat, models; streaming)."""
    from mergekit_lora.serving.sources import parse_adapters

    adapters = parse_adapters(adapter or [])
    _check_base(base)
    from mergekit_lora.serving.sources import adapter_kind

    for path in adapters.values():
        adapter_kind(path)
    if not 0 < port < 65536:
        raise LoraMergeError(f"--port must be 1..65535 (got {port})")
    for name, value in (("--max-tokens-limit", max_tokens_limit), ("--max-request-bytes", max_request_bytes),
                        ("--max-batch", max_batch)):
        if value < 1:
            raise LoraMergeError(f"{name} must be at least 1 (got {value})")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise LoraMergeError(f"--host {host} opens the server beyond this machine; give --api-key too")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LoraMergeError("loramerge serve needs fastapi and uvicorn: pip install 'mergekit-lora[serve]'") from None
    from mergekit_lora.serving.engine import Engine
    from mergekit_lora.serving.http import Limits
    from mergekit_lora.serving.http import serve as run_server

    _quiet()
    t0 = time.perf_counter()
    engine = Engine(base, adapters, device=device, dtype=dtype)
    err_console.print(f"loaded {base} and {len(adapters)} adapter(s) in {time.perf_counter() - t0:.1f} s on "
                      f"{engine.device}; models: {', '.join(engine.names())}", highlight=False, markup=False)
    err_console.print(f"serving http://{host}:{port}/v1 (OpenAI API{', API key required' if api_key else ''})",
                      highlight=False, markup=False)
    limits = Limits(max_tokens=max_tokens_limit, max_request_bytes=max_request_bytes, max_batch=max_batch,
                    window_ms=batch_window_ms)
    run_server(engine, host=host, port=port, api_key=api_key, limits=limits, log_level=log_level)
