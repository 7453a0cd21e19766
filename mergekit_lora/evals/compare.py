"""Method comparison: merge the same inputs with every registered method, evaluate fidelity and tasks.

A small YAML/JSON config names the base model, the input adapters (an adapter named like a suite
task is that task's *individual* adapter), the tasks, the methods (``all`` = every registered
method, found through the registry, so new algorithms appear without changes here) and their
parameters.  A method that fails is recorded with its error; the report still gets written.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergekit_lora.checks import check_output, weight_count
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.pipeline import MergeRequest, make_options, merge, resolve_device
from mergekit_lora.pipeline.output import output_folder
from mergekit_lora.registry import available

from .report import write_report
from .score_cache import (
    cached_fidelity,
    cached_scores,
    cached_scores_of,
    lookup_merge,
    merge_key,
    store_merge,
)
from .stats import add_intervals, add_paired_mean
from .tasks import encode_suite, load_base, normalized_accuracy, pad_id_of


class MethodSpec(BaseModel):
    """One merge to run: a method with its parameters and (optionally) its own weights and label.

    ``grid`` (e.g. ``{weight: [1/n, 2/n, 1], density: [0.3, 0.5, 0.7]}``) makes the row *tuned*: every
    combination is merged and scored on the validation slice (see :mod:`.tune`), the best is evaluated
    on the test set.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    weights: list[float] | None = None
    scale: str | float = "auto"  # the strength policy (mergekit_lora.strength); a grid may search it
    grid: dict[str, list[Any]] | None = None


class CompareConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    base: str = "smollm2-135m"
    adapters: dict[str, str]
    tasks: list[str] | None = None
    methods: list[str | MethodSpec] = Field(default_factory=lambda: ["all"])
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    weights: list[float] | None = None
    examples: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    max_text_tokens: int = Field(64, ge=1)
    device: str = "auto"
    seed: int = 0
    individual: Literal["all", "own"] = "all"  # evaluate each input adapter on every task or its own only
    references: dict[str, str] = Field(default_factory=dict)  # evaluated like inputs, never merged
    validation: int = Field(50, ge=1)  # validation examples per task for tuned (grid) rows
    bootstrap: int = Field(1000, ge=0)  # resamples for the confidence intervals (0: none)
    threads: int | None = Field(None, ge=1)  # torch CPU threads (1 on a busy shared machine); None: torch's default
    cache: bool = True  # reuse scores (and merges' fidelity) by the adapters' bytes (see score_cache)
    # harm outside the merged tasks (see harm.py): generic-text passages for perplexity (0: off), and
    # suite tasks none of the inputs was trained for (scored for the base and every merge)
    harm_passages: int = Field(0, ge=0)
    unseen: list[str] = Field(default_factory=list)
    reference_row: str = "linear"  # paired Δ of mean accuracy against this row (the exact average)


def load_config(path: str | Path) -> tuple[CompareConfig, Path]:
    """(config, folder that relative adapter paths are resolved against)."""
    p = Path(path)
    if not p.is_file():
        raise LoraMergeError(f"{p}: no such config file")
    try:
        raw = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise LoraMergeError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if isinstance(raw, dict) and raw.get("methods") == "all":
        raw["methods"] = ["all"]
    try:
        return CompareConfig.model_validate(raw), p.parent
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise LoraMergeError(f"{p}: {problems}") from None


def expand_methods(cfg: CompareConfig) -> list[MethodSpec]:
    specs: list[MethodSpec] = []
    for m in cfg.methods:
        if m == "all":
            specs += [MethodSpec(method=name, params=cfg.params.get(name, {})) for name in available()]
        elif isinstance(m, str):
            specs.append(MethodSpec(method=m, params=cfg.params.get(m, {})))
        else:
            specs.append(m)
    labels = [s.label or s.method for s in specs]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise LoraMergeError(f"methods: label {sorted(dup)[0]!r} is used twice; give each entry a distinct `label`")
    return specs


def _input_rank(path: Path) -> int | None:
    """The LoRA rank ``r`` of a PEFT folder (None for other kinds)."""
    cfg = path / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("r")


def run_compare(cfg: CompareConfig, root: Path, out: Path, *, force: bool = False,
                log=print) -> dict[str, Any]:
    """Merge with every method, evaluate fidelity and tasks, write report.{json,md,png} into ``out``."""
    from .suite.data import TASKS

    check_output(out, force)
    device = resolve_device(cfg.device)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    paths = {n: (root / p if not Path(p).is_absolute() else Path(p)) for n, p in cfg.adapters.items()}
    for n, p in paths.items():
        if not p.exists():
            raise LoraMergeError(f"adapters.{n}: {p} does not exist")
    tasks = cfg.tasks or [n for n in cfg.adapters if n in TASKS]
    if not tasks:
        raise LoraMergeError("no tasks: name them under `tasks:` or name adapters after suite tasks "
                             f"({', '.join(TASKS)})")
    own = {t: t for t in tasks if t in cfg.adapters}
    n = len(paths)
    weights = cfg.weights or [1.0 / n] * n
    weight_count(weights, n)
    specs = expand_methods(cfg)
    model, tok = load_base(cfg.base, device)
    encoded = encode_suite(tok, tasks, cfg.examples, cfg.max_text_tokens)
    ev = dict(batch_size=cfg.batch_size, device=device, pad_id=pad_id_of(tok))
    rows: list[dict[str, Any]] = []
    log("evaluating base")
    from .suite.model import resolve_base

    base_folder = resolve_base(cfg.base)

    def fixed(adapter: Path | None, enc: dict) -> dict[str, Any]:
        """Scores of ``adapter`` (base, input, reference or merge), read from the cache where possible."""
        t0 = time.perf_counter()
        got, cached = cached_scores(model, base_folder, adapter, enc, enabled=cfg.cache, **ev)
        return {"tasks": got, "cached": cached, "eval_seconds": time.perf_counter() - t0}

    harm = _harm_probe(cfg, model, tok, ev, fixed)
    probes_harm = bool(cfg.harm_passages or cfg.unseen)  # perplexity needs the merged adapter itself
    rows.append({"variant": "base", "kind": "base", **fixed(None, encoded), **harm(None)})
    refs = {n: (root / p if not Path(p).is_absolute() else Path(p)) for n, p in cfg.references.items()}
    for kind, group in (("individual", paths), ("reference", refs)):
        for name, p in group.items():
            if not p.exists():
                raise LoraMergeError(f"references.{name}: {p} does not exist")
            log(f"evaluating {kind} {name}")
            own_only = kind == "individual" and cfg.individual == "own" and name in encoded
            enc = {name: encoded[name]} if own_only else encoded
            rows.append({"variant": name, "kind": kind, "rank": _input_rank(p), **fixed(p, enc)})
    with tempfile.TemporaryDirectory(prefix="loramerge-compare-") as tmp:
        for spec in specs:
            label = spec.label or spec.method
            w = spec.weights or weights
            row: dict[str, Any] = {"variant": label, "kind": "merge", "method": spec.method, "params": spec.params,
                                   "weights": w}
            try:
                if spec.grid:
                    from .tune import tune_spec

                    log(f"tuning {label} on {cfg.validation} validation examples per task")
                    spec, w, row["tuning"] = tune_spec(spec, w, paths, cfg, tok, tasks, Path(tmp),
                                                       lambda f, enc: fixed(f, enc)["tasks"], log)
                    row.update(params=spec.params, weights=w, tuned=True)
                row["scale"] = str(spec.scale)
                key = merge_key(list(paths.values()), spec.method, spec.params, w, spec.scale, cfg.seed,
                                str(device)) if cfg.cache and not probes_harm else None
                if key is not None and (known := _known_merge(key, base_folder, encoded, ev)) is not None:
                    log(f"{label}: merge and scores cached")
                    row.update(known)
                    rows.append(row)
                    continue
                log(f"merging with {label}")
                t0 = time.perf_counter()
                res = merge(MergeRequest(sources=list(paths.values()), method=spec.method, params=spec.params,
                                         weights=w, options=make_options(out=Path(tmp) / label, device=cfg.device,
                                                                         seed=cfg.seed, scale=spec.scale)))
                row["merge_seconds"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                fid, _ = cached_fidelity(Path(tmp) / label, list(paths.values()), w, enabled=cfg.cache)
                row["fidelity"], row["rank"] = fid["overall"], fid["rank"]
                row["fidelity_seconds"] = time.perf_counter() - t0
                row["modules"] = res.modules
                row["merge_cached"] = False
                log(f"evaluating {label}")
                row.update(fixed(Path(tmp) / label, encoded), **harm(Path(tmp) / label))
                if key is not None:
                    store_merge(key, Path(tmp) / label, res.modules, fid)
            except Exception as e:  # a failing method is a row in the report, not the end of the run
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  {label} failed: {row['error']}")
            rows.append(row)
    matrix = {r["variant"]: r["tasks"] for r in rows if "tasks" in r}
    for row in rows:
        if "tasks" in row and all(t in row["tasks"] for t in tasks):
            accs = [row["tasks"][t]["accuracy"] for t in tasks]
            row["mean_accuracy"] = sum(accs) / len(accs)
            row["normalized_accuracy"] = normalized_accuracy(matrix, row["variant"], own)
    add_intervals(rows, tasks, own, resamples=cfg.bootstrap, seed=cfg.seed)
    add_paired_mean(rows, tasks, cfg.reference_row, resamples=cfg.bootstrap, seed=cfg.seed)
    report = {"config": cfg.model_dump(), "device": str(device), "tasks": tasks, "own": own, "rows": rows}
    with output_folder(out, force) as tmp_out:
        write_report(report, tmp_out)
    return report


def rerender(report_json: str | Path, out: Path, *, force: bool = False) -> dict[str, Any]:
    """Recompute the intervals of a saved ``report.json`` and write its report again into ``out``.

    Scores are read back as they are (per-example outcomes are in the JSON); only the statistics
    (bootstrap intervals, paired differences) and the rendering are redone, with the config's
    ``bootstrap`` and ``seed`` — for reports written before a statistic or column was added.
    """
    check_output(out, force)
    try:
        report = json.loads(Path(report_json).read_text())
        rows, tasks, own, cfg = report["rows"], report["tasks"], report["own"], report["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoraMergeError(f"{report_json}: not a report.json written by `eval compare` ({e})") from e
    for r in rows:
        for key in ("norm_ci", "paired", "paired_rank"):
            r.pop(key, None)
    add_intervals(rows, tasks, own, resamples=cfg.get("bootstrap", 1000), seed=cfg.get("seed", 0))
    with output_folder(out, force) as tmp_out:
        write_report(report, tmp_out)
    return report


def _known_merge(key: str, base_folder: Path, encoded: dict, ev: dict[str, Any]) -> dict[str, Any] | None:
    """A merge row's numbers without merging: the merge record of ``key`` and every score of its output read
    from the cache (None when either misses)."""
    t0 = time.perf_counter()
    rec = lookup_merge(key)
    scores = cached_scores_of(base_folder, rec["digest"], encoded, **ev) if rec is not None else None
    if scores is None:
        return None
    return {"merge_seconds": 0.0, "fidelity": rec["fidelity"], "rank": rec["rank"], "fidelity_seconds": 0.0,
            "modules": rec["modules"], "merge_cached": True, "tasks": scores, "cached": sorted(encoded),
            "eval_seconds": time.perf_counter() - t0}


def _harm_probe(cfg: CompareConfig, model, tok, ev: dict[str, Any], fixed):
    """``harm(adapter) -> {"harm": {...}}`` (empty when the config measures no harm)."""
    if not cfg.harm_passages and not cfg.unseen:
        return lambda adapter: {}
    from .harm import encode_passages, generic_passages, perplexity
    from .tasks import attached

    rows = encode_passages(tok, generic_passages(cfg.harm_passages)) if cfg.harm_passages else []
    unseen = encode_suite(tok, cfg.unseen, cfg.examples, cfg.max_text_tokens) if cfg.unseen else {}

    def measure(adapter: Path | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if rows:
            kw = dict(device=ev["device"], pad_id=ev["pad_id"], batch_size=ev["batch_size"])
            if adapter is None:
                out["ppl"] = perplexity(model, rows, **kw)
            else:
                with attached(model, adapter) as m:
                    out["ppl"] = perplexity(m, rows, **kw)
        if unseen:
            got = fixed(adapter, unseen)["tasks"]
            out["unseen"] = {t: got[t]["accuracy"] for t in unseen}
        return {"harm": out}

    return measure
