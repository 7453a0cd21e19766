"""``loramerge library``: index many adapters, search them by weight signature, dedupe, inspect, compose."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mergekit_lora.options import MergeOptions

from .common import console, err_console, parse_kv, user_errors
from .options import WRITE_OPTIONS, with_options

library_app = typer.Typer(help="An adapter library: a catalogue (SQLite) and weight-signature index (faiss) of "
                               "many adapters; search, dedupe, inspect, compose.", no_args_is_help=True)

LibArg = Annotated[Path, typer.Argument(metavar="LIB", help="the library folder (made by `library index -o`)")]
LikeOpt = Annotated[str, typer.Option("--like", help="an adapter (catalogued or not): find adapters like it")]
TopOpt = Annotated[int, typer.Option("--top-m", help="how many adapters to return")]


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _say(line: str) -> None:
    err_console.print(line, highlight=False, soft_wrap=True, markup=False)


@library_app.command()
@user_errors
def index(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCES...", help="adapters, folders of adapters, globs")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the library folder (created or updated)")],
    rehash: Annotated[bool, typer.Option(help="hash every adapter, even those whose size and mtime are unchanged")] = False,
) -> None:
    """Catalogue adapters (SQLite) and index their weight signatures (faiss); incremental."""
    from mergekit_lora.library import index_sources

    r = index_sources(sources, out, rehash=rehash, say=_say)
    console.print(f"library {out}: {r.total} adapters ({len(r.added)} added, {len(r.updated)} re-indexed, "
                  f"{r.unchanged} unchanged, {len(r.removed)} removed, {len(r.skipped)} skipped) "
                  f"in {r.seconds:.2f}s", highlight=False, soft_wrap=True)


@library_app.command()
@user_errors
def search(
    lib: LibArg,
    like: LikeOpt,
    top_m: TopOpt = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: a list of {source, score, ...}, best first")] = False,
) -> None:
    """The adapters nearest to --like by weight signature (score = 0.9·direction + 0.1·spectrum cosine)."""
    from mergekit_lora.library import search as run

    hits = run(lib, like, top_m, say=_say)
    if as_json:
        typer.echo(json.dumps(hits, indent=1))
        return
    console.print(f"{'score':>8} {'direction':>9} {'spectrum':>8}  adapter", highlight=False, soft_wrap=True)
    for h in hits:
        console.print(f"{h['score']:8.4f} {h['direction']:9.4f} {h['spectrum']:8.4f}  {h['source']}",
                      highlight=False, markup=False, soft_wrap=True)


@library_app.command()
@user_errors
def dedupe(
    lib: LibArg,
    threshold: Annotated[float, typer.Option(help="signature score at or above which two adapters are near-duplicates")] = 0.99,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: a list of {a, b, score}")] = False,
) -> None:
    """Near-duplicate pairs by weight signature."""
    from mergekit_lora.library import dedupe as run

    pairs = run(lib, threshold, say=_say)
    if as_json:
        typer.echo(json.dumps(pairs, indent=1))
        return
    if not pairs:
        console.print(f"no pairs at or above {threshold}", highlight=False, soft_wrap=True)
    for p in pairs:
        console.print(f"{p['score']:.4f}  {p['a']}  ~  {p['b']}", highlight=False, markup=False, soft_wrap=True)


@library_app.command("inspect")
@user_errors
def inspect_lib(
    lib: LibArg,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A summary: adapter count, formats, base models, ranks, target modules, size."""
    from mergekit_lora.library import summary

    s = summary(lib, say=_say)
    if as_json:
        typer.echo(json.dumps(s, indent=1))
        return
    console.print(f"library {s['library']}: {s['adapters']} adapters, {_size(s['size_bytes'])}, "
                  f"{s['indexed_vectors']} signatures indexed", highlight=False, markup=False, soft_wrap=True)
    for key in ("formats", "base_models", "ranks", "target_modules"):
        shown = ", ".join(f"{k} ×{v}" for k, v in s[key].items()) or "-"
        console.print(f"  {key.replace('_', ' '):<15} {shown}", highlight=False, markup=False, soft_wrap=True)


@library_app.command()
@user_errors
@with_options(*WRITE_OPTIONS)
def compose(
    lib: LibArg,
    like: LikeOpt,
    method: Annotated[str, typer.Option("--method", "-m", help="a merge method (`loramerge methods`) or route")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    top_m: TopOpt = 3,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="method parameter key=value (repeat)")] = None,
    *,
    options: MergeOptions,
) -> None:
    """Retrieve the top-m adapters like --like and merge (or route) them; the card records the query."""
    from mergekit_lora.library import compose as run

    result, hits = run(lib, like, method, out, top_m=top_m, params=parse_kv(param), options=options, say=_say)
    console.print(f"composed {len(hits)} adapters with {method} -> {result.out} ({result.modules} modules, "
                  f"{result.seconds:.2f}s)", highlight=False, markup=False, soft_wrap=True)
    for h in hits:
        console.print(f"  {h['score']:.4f}  {h['source']}", highlight=False, markup=False, soft_wrap=True)
