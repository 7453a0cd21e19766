"""Routing on the suite: implicit / gate / calibrated gate / hierarchical at several top-k vs static merges.

Calibration and profile data come from the *train* split of each task (the first ``--per-task``
examples after the fixed shuffle); scores are on the first ``-n`` *test* examples, so nothing is tuned
on the test set.  Every variant is scored per example, so the 95 % intervals are a paired bootstrap
over test examples (resampled within each task, the same draw for every variant).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python evals/suite/route_suite.py -n 50 --per-task 16 --steps 16

Variants (all routed adapters pool the four suite LoRAs with weights 1):
``implicit-k``, ``gate-k`` (uncalibrated), ``gate-cal-k`` (``loramerge route --router gate --calibrate``
on the labelled train mix), ``gate-cal-k-static`` (its ``--export-static``), ``hier-k`` (hierarchical,
top-1 adapter, profiles from the unlabeled train prompts), ``hierpool-k`` (the same profiles with one
pooled covariance), ``val-k`` (adapter-selection accuracy of hier-k / hierpool-k on the next
``--per-task`` *train* examples: choose between them without the test set), ``select`` (pick one adapter per request with
the hierarchical profiles, serve it with that adapter's own LoRA), and static merges.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mergekit_lora import merge
from mergekit_lora.evals.suite.data import get_task
from mergekit_lora.evals.suite.model import smollm2_folder
from mergekit_lora.evals.tasks import (
    EncodedTask,
    attached,
    encode_task,
    last_logits,
    load_base,
    pad_id_of,
    pad_left,
)
from mergekit_lora.routing import load_routed, write_routed
from mergekit_lora.routing.calibrate import make_batches
from mergekit_lora.routing.profile import fit_profiles, select_adapter
from mergekit_lora.routing.runtime import attach, detach

TASKS = ("topic", "sentiment", "genre", "language")
ROOT = Path(__file__).resolve().parents[2]
STATICS = {  # label -> (method, weights, params)
    "linear": ("linear", [0.25] * 4, {}),
    "linear-w0.5": ("linear", [0.5] * 4, {}),
    "svd-r8": ("svd", [0.25] * 4, {"rank": 8}),
    "ties-r8": ("ties", [0.25] * 4, {"rank": 8, "density": 0.5}),
    "dare_linear-r8": ("dare_linear", [0.25] * 4, {"rank": 8, "density": 0.5}),
}


@torch.no_grad()
def correct_vector(model, enc, device, pad_id: int, batch: int = 16) -> list[int]:
    """1/0 per test example (argmax over the task's label tokens), in test order."""
    out = [0] * len(enc)
    labels = enc.label_tokens.to(device)
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        pred = last_logits(model, [enc.ids[i] for i in idx], device, pad_id)[:, labels].argmax(1).cpu()
        for j, i in enumerate(idx):
            out[i] = int(pred[j] == enc.gold[i])
    return out


def score_variant(model, path, encoded, device, pad_id, tasks=TASKS) -> dict[str, list[int]]:
    with attached(model, path) as m:
        return {t: correct_vector(m, encoded[t], device, pad_id) for t in tasks}


def train_rows(tok, n: int) -> dict[str, list[tuple[list[int], int]]]:
    """(prompt ids, label token) for the first n train examples of each task."""
    out = {}
    for t in TASKS:
        task = get_task(t)
        enc = encode_task(task, tok, task.split()[0][:n])
        out[t] = [(ids, int(enc.label_tokens[g])) for ids, g in zip(enc.ids, enc.gold.tolist())]
    return out


def bootstrap(results: dict[str, dict[str, list[int]]], own: dict[str, list[int]], variants, ref: str,
              draws: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Normalised accuracy, its 95 % interval and the paired 95 % interval of (variant − ref)."""
    g = torch.Generator().manual_seed(seed)
    n = {t: len(own[t]) for t in TASKS}
    idx = {t: torch.randint(0, n[t], (draws, n[t]), generator=g) for t in TASKS}
    own_acc = {t: torch.tensor(own[t], dtype=torch.float64)[idx[t]].mean(1) for t in TASKS}

    def norm(v: str) -> torch.Tensor:
        return torch.stack([torch.tensor(results[v][t], dtype=torch.float64)[idx[t]].mean(1) / own_acc[t]
                            for t in TASKS]).mean(0)

    def point(v: str) -> float:
        return sum(sum(results[v][t]) / sum(own[t]) for t in TASKS) / len(TASKS)

    base = norm(ref)
    out = {}
    for v in variants:
        d = norm(v)
        lo, hi = d.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        dlo, dhi = (d - base).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[v] = {"norm": point(v), "lo": lo, "hi": hi, "diff": point(v) - point(ref), "dlo": dlo, "dhi": dhi,
                  **{t: sum(results[v][t]) / len(results[v][t]) for t in TASKS}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--examples", type=int, default=50)
    ap.add_argument("--per-task", type=int, default=64)
    ap.add_argument("--variants", nargs="+", default=[
        "linear", "hier-8", "implicit-8", "select-8", "gate-cal-8", "gate-8", "gate-cal-8-static", "hier-4",
        "implicit-4", "hier-16", "implicit-16", "gate-cal-16", "val-8", "hierpool-8", "svd-r8", "gate-4", "gate-16",
        "implicit-32", "gate-32", "gate-cal-4", "gate-cal-32"],
        help="in this order (the slow machine may not reach the end; results are saved after each)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "route-suite")
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "results" / "route-suite.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cpu")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    folder = smollm2_folder()
    model, tok = load_base(str(folder), dev)
    pad = pad_id_of(tok)
    adapters = [ROOT / "examples" / "suite" / t for t in TASKS]
    encoded = {t: encode_task(get_task(t), tok, get_task(t).test(args.examples)) for t in TASKS}
    prev = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results: dict[str, dict[str, list[int]]] = prev.get("correct", {})
    timing: dict[str, float] = prev.get("seconds", {})

    def run(label: str, path: Path, tasks=TASKS) -> None:
        if label in results:
            return
        t0 = time.perf_counter()
        results[label] = score_variant(model, path, encoded, dev, pad, tasks)
        timing[label] = time.perf_counter() - t0
        print(f"{label}: " + " ".join(f"{t}={sum(v) / len(v):.3f}" for t, v in results[label].items()),
              f"({timing[label]:.0f} s)", flush=True)
        save()

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"examples": args.examples, "per_task": args.per_task, "steps": args.steps,
                                        "correct": results, "seconds": timing}, indent=1) + "\n")

    for t, a in zip(TASKS, adapters):
        run(f"own-{t}", a, (t,))
    own = {t: results[f"own-{t}"][t] for t in TASKS}

    # calibration (labelled) and profile (prompt only) data: the first --per-task train examples per task
    rows = train_rows(tok, args.per_task)
    mixed = [r for group in zip(*(rows[t] for t in TASKS)) for r in group]  # interleaved: mixed batches
    random.Random(0).shuffle(mixed)
    cal = work / "calibrate.jsonl"
    cal.write_text("".join(json.dumps({"input_ids": ids + [lab], "labels": [-100] * len(ids) + [lab]}) + "\n"
                           for ids, lab in mixed))
    profile = [make_batches([(ids, ids) for ids, _ in rows[t]], 16) for t in TASKS]
    w1 = [1.0] * 4

    def build(v: str) -> Path:
        """The adapter folder of variant ``v`` (made once under --work)."""
        p = work / v
        if v.endswith("-static"):
            return build(v[: -len("-static")]) / "static"
        if p.exists():
            return p
        if v in STATICS:
            method, w, params = STATICS[v]
            merge(adapters, method, p, weights=w, params=params, force=True)
            return p
        kind, k = v.rsplit("-", 1)
        if kind in ("implicit", "gate"):
            merge(adapters, "route", p, weights=w1, params={"top_k": int(k), "router": kind}, force=True)
        elif kind == "gate-cal":
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "mergekit_lora.cli.main", "route", *map(str, adapters), "-o", str(p),
                   "--router", "gate", "-k", k, "--weights", "1,1,1,1", "--calibrate", str(cal),
                   "--base", str(folder), "--steps", str(args.steps), "--export-static", "--device", "cpu"]
            subprocess.run(cmd, check=True)
            timing[f"calibrate-{k}"] = time.perf_counter() - t0
            c = json.loads((p / "routing_config.json").read_text())["calibration"]
            timing[f"calibrate-{k}-loss"] = [c["loss_before"], c["loss_after"]]  # type: ignore[assignment]
            print(f"calibrated k={k}: loss {c['loss_before']:.3f} -> {c['loss_after']:.3f}", flush=True)
        elif kind == "hierpool":  # the hier-k profiles with one pooled diagonal covariance
            src = load_routed(build(f"hier-{k}"))
            mods = {}
            for n, m in src.modules.items():
                v = m.profile_var.mean(0, keepdim=True).expand_as(m.profile_var).clone()
                mods[n] = replace(m, profile_var=v)
            p.mkdir()
            write_routed(p, mods.items(), base_model=src.base_model, sources=src.sources)
        elif kind == "hier" and any((work / f"hier-{j}").exists() for j in (4, 8, 16, 32)):
            done = next(work / f"hier-{j}" for j in (4, 8, 16, 32) if (work / f"hier-{j}").exists())
            fitted = load_routed(done)  # the profiles do not depend on k: reuse them
            p.mkdir()
            write_routed(p, ((n, replace(m, top_k=min(int(k), m.rank))) for n, m in fitted.modules.items()),
                         base_model=fitted.base_model, sources=fitted.sources)
        elif kind == "hier":
            merge(adapters, "route", work / f"hier-raw-{k}", weights=w1,
                  params={"top_k": int(k), "router": "hierarchical"}, force=True)
            routed = load_routed(work / f"hier-raw-{k}")
            h = attach(model, routed)
            try:
                t0 = time.perf_counter()
                fit_profiles(model, h, profile)
                timing["profile"] = time.perf_counter() - t0
                fitted = h.routed(routed)
            finally:
                detach(model)
            p.mkdir()
            write_routed(p, fitted.modules.items(), base_model=routed.base_model, sources=routed.sources)
        else:
            raise SystemExit(f"unknown variant {v}")
        return p

    def chosen_on(v: str, enc: dict) -> dict[str, list[int]]:
        routed = load_routed(build(v))
        h = attach(model, routed)
        out: dict[str, list[int]] = {}
        try:
            for t in TASKS:
                ch: list[int] = []
                for s in range(0, len(enc[t]), 16):
                    ids, mask, _ = pad_left(enc[t].ids[s:s + 16], pad)
                    ch += select_adapter(model, h, ids, mask).tolist()
                out[t] = ch
        finally:
            detach(model)
        return out

    def validate(variants: list[str]) -> None:
        """Selection accuracy on held-out *train* examples (per-task ones after the profile data): picks the
        profile variant without looking at the test set."""
        val = {t: encode_task(get_task(t), tok, get_task(t).split()[0][args.per_task:2 * args.per_task])
               for t in TASKS}
        accs = {}
        for v in variants:
            ch = chosen_on(v, val)
            accs[v] = {t: sum(c == i for c in ch[t]) / len(ch[t]) for i, t in enumerate(TASKS)}
            print(f"validation selection accuracy {v}: {accs[v]}", flush=True)
        timing["validation-selection"] = accs  # type: ignore[assignment]
        save()

    def select(k: int) -> None:
        """Pick the adapter per request from the profiles, then serve it with that adapter's own LoRA."""
        routed = load_routed(build(f"hier-{k}"))
        h = attach(model, routed)
        chosen: dict[str, list[int]] = {}
        t0 = time.perf_counter()
        try:
            for t in TASKS:
                ch: list[int] = []
                for s in range(0, len(encoded[t]), 16):
                    ids, mask, _ = pad_left(encoded[t].ids[s:s + 16], pad)
                    ch += select_adapter(model, h, ids, mask).tolist()
                chosen[t] = ch
        finally:
            detach(model)
        res = {t: [0] * len(encoded[t]) for t in TASKS}
        for i, a in enumerate(adapters):  # serve each request with its chosen adapter
            todo = {t: [j for j, c in enumerate(chosen[t]) if c == i] for t in TASKS}
            mine = {t: js for t, js in todo.items() if t == TASKS[i]}  # already scored: own-<task>
            for t, js in mine.items():
                for j in js:
                    res[t][j] = own[t][j]
            other = {t: js for t, js in todo.items() if js and t != TASKS[i]}
            if other:
                with attached(model, a) as m:
                    for t, js in other.items():
                        e = encoded[t]
                        sub = EncodedTask(t, [e.ids[j] for j in js], e.gold[js], e.label_tokens)
                        for j, c in zip(js, correct_vector(m, sub, dev, pad)):
                            res[t][j] = c
        results["select"] = res
        timing["select"] = time.perf_counter() - t0
        timing["select-own-adapter-share"] = {t: sum(c == i for c in chosen[t]) / len(chosen[t])  # type: ignore[misc]
                                              for i, t in enumerate(TASKS)}
        print("select:", {t: sum(v) / len(v) for t, v in res.items()}, timing["select-own-adapter-share"], flush=True)
        save()

    for v in args.variants:
        if v in results:
            continue
        if v.startswith("val-"):
            if "validation-selection" not in timing:
                validate([f"hier-{v.split('-')[1]}", f"hierpool-{v.split('-')[1]}"])
            continue
        if v.startswith("select-"):
            if "select" not in results:
                select(int(v.split("-")[1]))
            continue
        run(v, build(v))
    results.pop("select-8", None)
    statics = [s for s in STATICS if s in results]
    best = max(statics, key=lambda s: sum(sum(results[s][t]) / sum(own[t]) for t in TASKS))
    variants = [v for v in args.variants if v in results] + (["select"] if "select" in results else [])
    table = bootstrap(results, own, variants, best)
    print(f"\n| variant | {' | '.join(TASKS)} | norm. acc [95 % CI] | vs {best} [paired 95 % CI] |")
    print("|---|" + "---:|" * (len(TASKS) + 2))
    for v, r in table.items():
        print(f"| {v} | " + " | ".join(f"{r[t]:.2f}" for t in TASKS)
              + f" | {r['norm']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | {r['diff']:+.3f} [{r['dlo']:+.3f}, {r['dhi']:+.3f}] |")
    print("own:", {t: sum(v) / len(v) for t, v in own.items()})
    prev = json.loads(args.out.read_text())
    prev["table"] = table
    prev["best_static"] = best
    args.out.write_text(json.dumps(prev, indent=1) + "\n")


if __name__ == "__main__":
    main()
