"""``loramerge library``: index many adapters, search them by weight signature, dedupe, inspect, compose."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.options import MergeOptions

from .common import console, err_console, parse_kv, user_errors
from .options import WRITE_OPTIONS, with_options

library_app = typer.Typer(help="An adapter library: a catalogue (SQLite) and weight-signature index (faiss) of "
                               "many adapters; search, dedupe, inspect, compose.", no_args_is_help=True)

LibArg = Annotated[Path, typer.Argument(metavar="LIB", help="the library folder (made by `library index -o`)")]
LikeOpt = Annotated[str | None, typer.Option("--like", help="an adapter (catalogued or not): find adapters like "
                                                            "it by weight signature")]
ExamplesQueryOpt = Annotated[Path | None, typer.Option("--examples", help="a JSONL file of unlabeled examples "
                                                       "({\"text\": ...} rows): rank adapters by domain profile")]
BaseOpt = Annotated[str | None, typer.Option("--base", help="the base model for domain profiles: a transformers "
                                             "folder or smollm2-135m (index: required with --examples the first "
                                             "time; search/compose: default the library's)")]
TopOpt = Annotated[int, typer.Option("--top-m", help="how many adapters to return")]
RerankOpt = Annotated[str | None, typer.Option("--rerank", help="with --examples: reorder the profile's shortlist "
                                               "by each adapter's behaviour on the examples (adapter attached): "
                                               "confidence (minus mean next-token entropy), infomax, or none "
                                               "(profile only); default confidence")]
ShortlistOpt = Annotated[int | None, typer.Option("--shortlist", help="with --rerank: how many profile hits to "
                                                  "rerank (default 5)")]


def _rerank_kw(rerank: str | None, shortlist: int | None, like: str | None) -> dict:
    if like is not None and (rerank is not None or shortlist is not None):
        raise LoraMergeError("--rerank/--shortlist apply to --examples queries only (--like ranks by weight "
                             "signature); drop them")
    return {k: v for k, v in (("rerank", rerank), ("shortlist", shortlist)) if v is not None}


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
    examples: Annotated[list[str] | None, typer.Option(
        "--examples", help="SOURCE=FILE.jsonl: unlabeled examples of an adapter's domain; fits its domain profile "
                           "(repeat)")] = None,
    base: BaseOpt = None,
    ray: Annotated[bool, typer.Option("--ray", help="compute profiles on Ray actors (one base model per worker)")] = False,
    ray_workers: Annotated[int, typer.Option("--ray-workers", help="Ray actors for --ray")] = 2,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="join this Ray cluster (default: local "
                                                                           "Ray, or $RAY_ADDRESS)")] = None,
) -> None:
    """Catalogue adapters (SQLite) and index their weight signatures (faiss); incremental.  With --examples,
    also their domain profiles (the hierarchical router's input statistics on the base model)."""
    from mergekit_lora.library import index_sources

    pairs: dict[str, str] = {}
    for item in examples or []:
        src, sep, f = item.rpartition("=")
        if not sep or not src or not f:
            raise LoraMergeError(f"--examples takes SOURCE=FILE.jsonl (got {item!r})")
        pairs[src] = f
    r = index_sources(sources, out, rehash=rehash, examples=pairs, base=base,
                      ray_workers=ray_workers if ray else None, ray_address=ray_address, say=_say)
    prof = f", {len(r.profiled)} profiled in {r.profile_seconds:.1f}s" if r.profiled else ""
    console.print(f"library {out}: {r.total} adapters ({len(r.added)} added, {len(r.updated)} re-indexed, "
                  f"{r.unchanged} unchanged, {len(r.removed)} removed, {len(r.skipped)} skipped{prof}) "
                  f"in {r.seconds:.2f}s", highlight=False, soft_wrap=True)


def _one_query(like: str | None, examples: Path | None) -> None:
    if (like is None) == (examples is None):
        raise LoraMergeError("give exactly one query: --like ADAPTER (weight signature) or --examples FILE.jsonl "
                             "(domain profile)")


@library_app.command()
@user_errors
def search(
    lib: LibArg,
    like: LikeOpt = None,
    examples: ExamplesQueryOpt = None,
    top_m: TopOpt = 5,
    base: BaseOpt = None,
    rerank: RerankOpt = None,
    shortlist: ShortlistOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: a list of {source, score, ...}, best first")] = False,
) -> None:
    """The adapters nearest to --like by weight signature (score = 0.9·direction + 0.1·spectrum cosine), or
    those best matching --examples: the domain profile's shortlist (mean token log-likelihood per module)
    reranked by each adapter's confidence on the examples (--rerank)."""
    from mergekit_lora.library import search as run
    from mergekit_lora.library import search_examples

    _one_query(like, examples)
    kw = _rerank_kw(rerank, shortlist, like)
    hits = run(lib, like, top_m, say=_say) if like is not None else \
        search_examples(lib, examples, top_m, base=base, say=_say, **kw)  # type: ignore[arg-type]
    if as_json:
        typer.echo(json.dumps(hits, indent=1))
        return
    if examples is not None:
        console.print(f"{'score':>10}  adapter", highlight=False, soft_wrap=True)
        for h in hits:
            console.print(f"{h['score']:10.3f}  {h['source']}", highlight=False, markup=False, soft_wrap=True)
        if hits:
            console.print(f"why (best): {hits[0]['why']}", highlight=False, markup=False, soft_wrap=True)
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
    plot: Annotated[Path | None, typer.Option("--plot", help="also draw the signature clusters (2-D PCA, one "
                                                             "colour per cluster) into this PNG")] = None,
    clusters: Annotated[int | None, typer.Option("--clusters", help="how many k-means clusters of the signatures "
                                                                    "(default ≈ √(n/2), at most 12)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A summary: adapter count, formats, base models, ranks, target modules, size, profiles, clusters."""
    from mergekit_lora.library import summary

    s = summary(lib, say=_say, plot=plot, k=clusters)
    if as_json:
        typer.echo(json.dumps(s, indent=1))
        return
    console.print(f"library {s['library']}: {s['adapters']} adapters, {_size(s['size_bytes'])}, "
                  f"{s['indexed_vectors']} signatures indexed, {s['profiles']} domain profiles",
                  highlight=False, markup=False, soft_wrap=True)
    for key in ("formats", "base_models", "ranks", "target_modules"):
        shown = ", ".join(f"{k} ×{v}" for k, v in s[key].items()) or "-"
        console.print(f"  {key.replace('_', ' '):<15} {shown}", highlight=False, markup=False, soft_wrap=True)
    for c in s["clusters"]:
        console.print(f"  cluster {c['cluster']:<3} {c['size']:>5} adapters, e.g. {c['representative']}",
                      highlight=False, markup=False, soft_wrap=True)
    if plot is not None:
        console.print(f"clusters drawn -> {s['plot']}", highlight=False, markup=False, soft_wrap=True)


@library_app.command()
@user_errors
@with_options(*WRITE_OPTIONS)
def compose(
    lib: LibArg,
    method: Annotated[str, typer.Option("--method", "-m", help="a merge method (`loramerge methods`) or route")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    like: LikeOpt = None,
    examples: ExamplesQueryOpt = None,
    top_m: TopOpt = 3,
    base: BaseOpt = None,
    rerank: RerankOpt = None,
    shortlist: ShortlistOpt = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="method parameter key=value (repeat)")] = None,
    *,
    options: MergeOptions,
) -> None:
    """Retrieve the top-m adapters (like --like, or for --examples) and merge (or route) them; the card records
    the query and the choice."""
    from mergekit_lora.library import compose as run

    _one_query(like, examples)
    result, hits = run(lib, method, out, like=like, examples=examples, top_m=top_m, params=parse_kv(param),
                       options=options, base=base, say=_say, **_rerank_kw(rerank, shortlist, like))
    console.print(f"composed {len(hits)} adapters with {method} -> {result.out} ({result.modules} modules, "
                  f"{result.seconds:.2f}s)", highlight=False, markup=False, soft_wrap=True)
    for h in hits:
        console.print(f"  {h['score']:.4f}  {h['source']}", highlight=False, markup=False, soft_wrap=True)
