"""Bounded load test of ``loramerge serve`` on loopback: base / static / routed / auto, 1 vs 8 clients.

One real server process (``python -m mergekit_lora.cli.main serve``, ``OMP_NUM_THREADS`` as given) holds
every target at once, so each comparison is within one run and one process.  For every (model, clients)
cell, ``--requests`` requests are sent by that many client threads (each waits for its answer before the
next), in ``--rounds`` rounds that go round-robin over the models (so load from other processes hits
every model alike); a round stops at ``--time-limit`` seconds, and each request has that limit as its
timeout.  A
request is *ok* when it returns 200 with a finish reason and the requested token budget is respected;
anything else is an *error*; a request still open at the limit is *hung*.  Lost = errors + hung (goal: 0).

    OMP_NUM_THREADS=1 .venv/bin/python evals/bench/serve_bench.py --model tiny --requests 64
    OMP_NUM_THREADS=1 .venv/bin/python evals/bench/serve_bench.py --model smollm2 --requests 32 --max-tokens 16

``tiny``: the tests' tiny Llama (2 layers, hidden 32) with two PEFT LoRAs (static = ``a``), their routed
(implicit, top-3) composition and a hierarchical routed adapter with profiles (``auto``).  ``smollm2``:
SmolLM2-135M-Instruct with the four suite LoRAs (static = ``topic``), ``route --top-k 8`` over them and
``route --router hierarchical`` with profiles from 16 train prompts per task (``auto``); prompts are the
suite's test prompts of all four tasks in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
TASKS = ("topic", "sentiment", "genre", "language")


def tiny_setup(tmp: Path) -> tuple[list[str], dict[str, list[str]], str]:
    from serve_helpers import adapters, domain_text, hierarchical_adapter, tiny_base

    base = tiny_base(tmp / "base", planted_domains=True)
    ad = adapters(tmp)
    ad["hier"] = hierarchical_adapter(base, ad["a"], ad["b"], tmp / "hier")
    args = ["--base", str(base), *[x for n in ("a", "b", "routed", "hier") for x in ("--adapter", f"{n}={ad[n]}")]]
    texts = [t for i in range(32) for t in (domain_text(0, 1, seed=i)[0], domain_text(1, 1, seed=1000 + i)[0])]
    return args, {"base": texts, "static": texts, "routed": texts, "auto": texts}, "a"


def smollm2_setup(tmp: Path) -> tuple[list[str], dict[str, list[str]], str]:
    from mergekit_lora.evals.suite.data import get_task
    from mergekit_lora.evals.suite.model import smollm2_folder
    from mergekit_lora.routing import route

    folder = smollm2_folder()
    suite = [ROOT / "examples" / "suite" / t for t in TASKS]
    profiles = []
    for t in TASKS:
        task = get_task(t)
        p = tmp / f"profile-{t}.jsonl"
        p.write_text("".join(json.dumps({"text": task.before + e.text + task.after}) + "\n"
                             for e in task.validation(16)))
        profiles.append(p)
    route(suite, tmp / "routed", top_k=8)
    route(suite, tmp / "hier", top_k=8, router="hierarchical", profiles=profiles, base=folder)
    args = ["--base", "smollm2-135m", *[x for t, p in zip(TASKS, suite) for x in ("--adapter", f"{t}={p}")],
            "--adapter", f"routed={tmp / 'routed'}", "--adapter", f"hier={tmp / 'hier'}"]
    tasks = [get_task(t) for t in TASKS]
    texts = [tk.before + e.text + tk.after for i in range(16) for tk in tasks for e in tk.test(16)[i:i + 1]]
    return args, {"base": texts, "static": texts, "routed": texts, "auto": texts}, "topic"


def cell(url: str, model: str, prompts: list[str], *, clients: int, requests: int, max_tokens: int,
         limit: float) -> dict:
    lat: list[float] = []
    toks = [0]
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    nxt = iter(range(requests))
    t0 = time.perf_counter()
    deadline = t0 + limit

    def client() -> None:
        with httpx.Client(timeout=limit) as c:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                        "temperature": 0}
                s = time.perf_counter()
                try:
                    r = c.post(url + "/v1/completions", json=body)
                    j = r.json()
                    ok = (r.status_code == 200 and j["choices"][0]["finish_reason"] in ("stop", "length")
                          and j["usage"]["completion_tokens"] <= max_tokens)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    ok, j = False, {"error": repr(e)}
                with lock:
                    if ok:
                        lat.append(time.perf_counter() - s)
                        toks[0] += j["usage"]["completion_tokens"]
                    else:
                        errors.append(str(j)[:200])
                    done[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    before = httpx.get(url + "/health").json()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()) + 1.0)
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/health").json()
    hung = sum(t.is_alive() for t in threads)  # a thread still waiting on a request at the limit
    return {"model": model, "clients": clients, "lat": lat, "tokens": toks[0], "errors": errors, "hung": hung,
            "sent": done[0] + hung, "wall": wall, "batches": after["batches"] - before["batches"],
            "rows": after["rows"] - before["rows"]}


def summarize(parts: list[dict]) -> dict:
    """One (model, clients) cell from its rounds: counts and wall times add up, latencies pool."""
    lat = sorted(x for p in parts for x in p["lat"])
    wall = sum(p["wall"] for p in parts)
    q = (lambda f: 1000 * lat[min(len(lat) - 1, int(f * len(lat)))]) if lat else (lambda f: float("nan"))
    nb = sum(p["batches"] for p in parts)
    errors = [e for p in parts for e in p["errors"]]
    return {"model": parts[0]["model"], "clients": parts[0]["clients"], "sent": sum(p["sent"] for p in parts),
            "ok": len(lat), "errors": len(errors), "hung": sum(p["hung"] for p in parts), "wall": wall,
            "rps": len(lat) / wall, "tps": sum(p["tokens"] for p in parts) / wall, "p50": q(0.50), "p95": q(0.95),
            "batch": sum(p["rows"] for p in parts) / nb if nb else 0.0, "first_error": errors[0] if errors else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--requests", type=int, default=64, help="requests per (model, clients) cell")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="each cell's requests are sent in this many rounds, "
                    "round-robin over the models")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per cell (and per request)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="append the markdown table here")
    args = ap.parse_args()
    from serve_helpers import Server

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        server_args, prompts, static = (tiny_setup if args.model == "tiny" else smollm2_setup)(tmp)
        server = Server([*server_args, "--device", args.device, "--log-level", "warning"], timeout=900)
        print(f"setup + server start: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = []
        try:
            for clients in [int(c) for c in args.clients.split(",")]:
                parts: dict[str, list[dict]] = {}
                for _ in range(args.rounds):  # round-robin: a noisy neighbour hits every model alike
                    for label, model in (("base", "base"), ("static", static), ("routed", "routed"), ("auto", "auto")):
                        parts.setdefault(label, []).append(
                            cell(server.url, model, prompts[label], clients=clients,
                                 requests=max(1, args.requests // args.rounds), max_tokens=args.max_tokens,
                                 limit=args.time_limit))
                for label, ps in parts.items():
                    r = summarize(ps)
                    r["label"] = label
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
        finally:
            rc, log = server.stop()
        print(f"server exit {rc}", file=sys.stderr)
    table = render(rows, args, rc)
    print(table)
    if args.out:
        with args.out.open("a") as f:
            f.write(table + "\n")


def render(rows: list[dict], args: argparse.Namespace, rc: int) -> str:
    import torch

    cmd = "OMP_NUM_THREADS={} .venv/bin/python evals/bench/serve_bench.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:]))
    dev = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else (
        f"CPU {platform.machine()}, {os.cpu_count()} cores (shared), load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    out = [f"### {args.model}: {args.requests} requests per cell in {args.rounds} rounds, max_tokens "
           f"{args.max_tokens}, greedy",
           "", f"`{cmd}` — {dev}; torch {torch.__version__}; server exit after SIGTERM: {rc}", "",
           "| model | clients | ok / sent | errors | hung | req/s | tokens/s | p50 ms | p95 ms | mean batch |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} (`{r['model']}`) | {r['clients']} | {r['ok']} / {r['sent']} | {r['errors']} | "
                   f"{r['hung']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['batch']:.2f} |")
    by = {(r["label"], r["clients"]): r for r in rows}
    out.append("")
    for c in sorted({r["clients"] for r in rows}):
        s, ro = by.get(("static", c)), by.get(("routed", c))
        if s and ro and s["tps"] and s["rps"]:
            out.append(f"- {c} client(s): routed / static = {ro['tps'] / s['tps']:.2f}× tokens/s, "
                       f"{ro['rps'] / s['rps']:.2f}× requests/s")
    lost = sum(r["errors"] + r["hung"] for r in rows)
    out.append(f"- requests lost or hung: {lost} of {sum(r['sent'] for r in rows)}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
