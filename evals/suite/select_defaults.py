"""Choose every method's defaults on the validation slices of the *selection* scenarios only.

    python evals/suite/select_defaults.py run [--scenario S ...] [--method M ...]   # score candidates (resumable)
    python evals/suite/select_defaults.py choose                                    # the rule below, as a table

The selection rule (evals/RESULTS.md states it with the numbers):
  for each method, among its candidate settings (strength ``scale`` × the method's own knob), the setting
  with the highest mean validation accuracy, averaged first over a scenario's tasks, then over the
  selection scenarios (each scenario counts once, whatever its task count).  Ties: the earlier candidate.
  A default strength must not depend on the number of inputs by accident, so ``scale: none`` (the
  method's own output: TIES' disjoint mean of 1/n-weighted tensors keeps ~0.2–0.5 of the average's energy,
  LoRA-LEGO's reweighting 1.5× at 3 inputs and 2.7× at 8) is scored and reported but is a default
  candidate only for ``linear`` (where it *is* the exact average); route's ``sum`` is its full strength.
The validation slice is the head of each task's train split (``VALIDATION`` examples per task), never a
test example; the held-out scenarios (``HELD_OUT`` in scenarios.py) take no part in the choice and are
reported once, at the chosen defaults, by ``loramerge eval compare``.

Scores go to ``evals/results/selection/<scenario>.jsonl`` (one line per candidate), so runs resume, and
two processes can score different scenarios side by side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EX = ROOT / "examples" / "suite"
OUT = ROOT / "evals" / "results" / "selection"

# Scenarios the defaults are chosen on (validation slices only).
SELECTION: dict[str, dict[str, str]] = {
    "sel-b3": {"script": "script", "polarity": "polarity", "region": "region"},
    "sel-c": {"script": "r4/script", "polarity": "polarity", "region": "r16/region", "subject": "r16/subject"},
    "sel-old3": {"sentiment": "sentiment", "genre": "genre", "language": "language"},
}

VALIDATION = 40
STRONG = ["average", "1.5*average", "2*average", "3*average"]


def candidates() -> list[dict[str, Any]]:
    """Every (method, params, scale) the rule chooses among: the strengths × the method's main knob.

    ``none`` is each method's own output at the default weights 1/n (for linear: the exact average)."""
    out: list[dict[str, Any]] = []

    def add(method: str, params: dict[str, Any] | None = None, scales: list[str] = STRONG) -> None:
        out.extend({"method": method, "params": dict(params or {}), "scale": s} for s in scales)

    add("linear", scales=["none", "1.5*average", "2*average", "3*average"])
    add("svd", scales=["none", "1.5*average", "2*average", "3*average"])
    for m in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        add(m, {"density": 0.5}, ["none", *STRONG])
    add("ties", {"density": 0.2}, ["average"])
    add("ties", {"density": 0.8}, ["average"])
    add("ties", {"density": 0.5, "space": "core"}, STRONG[:3])
    add("lego", scales=["none", *STRONG])
    add("lego", {"reweight": "lsq"}, ["average"])
    # (the 3*average candidates of the methods above were added after a first pass put them at 2*average,
    # the grid's edge; tsv/iso got 4* and 6* for the same reason)
    add("knots_ties", {"density": 0.2})
    add("knots_ties", {"density": 1.0}, STRONG[:3])
    add("knots_dare_ties")
    for m in ("tsv", "iso_c", "iso_cts"):
        add(m, scales=[*STRONG, "4*average", "6*average"])
    for k in ("r/4", "r/2", "r"):
        add("route", {"top_k": k}, ["sum"])
    return out


def key(c: dict[str, Any]) -> str:
    return json.dumps([c["method"], c["params"], c["scale"]], sort_keys=True)


def _resolve(params: dict[str, Any], r: int) -> dict[str, Any]:
    """``top_k: "r/4" | "r/2" | "r" | "2r"`` in units of the scenario's largest input rank r."""
    mult = {"r/4": 0.25, "r/2": 0.5, "r": 1, "2r": 2}
    return {k: max(1, int(mult[v] * r)) if isinstance(v, str) and v in mult else v for k, v in params.items()}


def run(scenarios: list[str], methods: list[str] | None) -> None:
    import torch

    from mergekit_lora.errors import LoraMergeError
    from mergekit_lora.evals.score_cache import cached_scores
    from mergekit_lora.evals.suite.model import resolve_base
    from mergekit_lora.evals.tasks import encode_suite, load_base, pad_id_of
    from mergekit_lora.pipeline import merge
    from mergekit_lora.registry import available

    torch.set_num_threads(1)
    device = torch.device("cpu")
    model, tok = load_base("smollm2-135m", device)
    base = resolve_base("smollm2-135m")
    names = available()
    OUT.mkdir(parents=True, exist_ok=True)
    for scen in scenarios:
        adapters = {t: EX / p for t, p in SELECTION[scen].items()}
        rank = max(json.loads((p / "adapter_config.json").read_text())["r"] for p in adapters.values())
        enc = encode_suite(tok, list(adapters), VALIDATION, 64, split="validation")
        ev = dict(batch_size=32, device=device, pad_id=pad_id_of(tok))
        path = OUT / f"{scen}.jsonl"
        done = {json.loads(line)["key"] for line in path.open()} if path.exists() else set()
        if "base" not in done:
            got, _ = cached_scores(model, base, None, enc, **ev)
            _append(path, {"key": "base", "tasks": {t: got[t]["accuracy"] for t in enc}})
        for c in candidates():
            if (methods and c["method"] not in methods) or c["method"] not in names or key(c) in done:
                continue
            if any(k not in names[c["method"]].Params.model_fields for k in c["params"]):
                continue  # a knob this build's method does not have (yet)
            params = _resolve(c["params"], rank)
            with tempfile.TemporaryDirectory(prefix="select-") as tmp:
                t0 = time.perf_counter()
                try:
                    merge(list(adapters.values()), c["method"], Path(tmp) / "m", params=params, scale=c["scale"],
                          device="cpu", seed=0)
                except LoraMergeError as e:
                    _append(path, {"key": key(c), **c, "error": str(e)})
                    continue
                secs = time.perf_counter() - t0
                got, _ = cached_scores(model, base, Path(tmp) / "m", enc, **ev)
                shutil.rmtree(Path(tmp) / "m", ignore_errors=True)
            accs = {t: got[t]["accuracy"] for t in enc}
            rec = {"key": key(c), **c, "resolved": params, "tasks": accs, "mean": sum(accs.values()) / len(accs),
                   "merge_seconds": secs}
            _append(path, rec)
            print(f"{scen} {c['method']} {c['params']} {c['scale']}: {rec['mean']:.3f}", flush=True)


def _append(path: Path, rec: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def load() -> dict[str, dict[str, dict[str, Any]]]:
    """{scenario: {candidate key: record}} of every scored candidate."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scen in SELECTION:
        path = OUT / f"{scen}.jsonl"
        if path.exists():
            out[scen] = {(r := json.loads(line))["key"]: r for line in path.open()}
    return out


def choose(scores: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The rule: per method, the candidate with the best mean over scenarios of the scenario mean."""
    best: dict[str, dict[str, Any]] = {}
    for c in candidates():
        if c["scale"] == "none" and c["method"] != "linear":
            continue  # scored for the record, never a default (see the rule)
        recs = [scores[s].get(key(c)) for s in SELECTION if s in scores]
        if not recs or any(r is None or "mean" not in r for r in recs):
            continue
        value = sum(r["mean"] for r in recs) / len(recs)
        cur = best.get(c["method"])
        if cur is None or value > cur["value"]:
            best[c["method"]] = {**c, "value": value, "per_scenario": {s: scores[s][key(c)]["mean"] for s in scores}}
    return best


def table(scores: dict[str, dict[str, dict[str, Any]]]) -> str:
    chosen = choose(scores)
    base = {s: sum(v["tasks"].values()) / len(v["tasks"]) for s, recs in scores.items() if (v := recs.get("base"))}
    lines = ["| method | chosen default | validation mean (over scenarios) | " + " | ".join(scores) + " |",
             "|---|---|---|" + "---|" * len(scores),
             "| base model | – | " + f"{sum(base.values()) / max(len(base), 1):.3f} | "
             + " | ".join(f"{base.get(s, float('nan')):.3f}" for s in scores) + " |"]
    for m, c in sorted(chosen.items(), key=lambda kv: -kv[1]["value"]):
        knob = ", ".join(f"{k}={v}" for k, v in c["params"].items())
        lines.append(f"| {m} | {knob + '; ' if knob else ''}scale={c['scale']} | {c['value']:.3f} | "
                     + " | ".join(f"{c['per_scenario'].get(s, float('nan')):.3f}" for s in scores) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scenario", action="append", choices=list(SELECTION))
    r.add_argument("--method", action="append")
    sub.add_parser("choose")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.scenario or list(SELECTION), args.method)
    else:
        print(table(load()))


if __name__ == "__main__":
    main()
