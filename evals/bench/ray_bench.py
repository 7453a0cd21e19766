"""Benchmark `merge --ray` on a synthetic adapter library (not a test): local driver vs Ray, 1 and 2 workers.

Writes N synthetic rank-r PEFT adapters (Llama-like layout: per layer q,k,v,o hidden×hidden; gate, up
intermediate×hidden; down hidden×intermediate) and merges all of them, each run in a fresh
subprocess: the local driver, then Ray with 1 and 2 local workers.  Reported per run: wall time of
the merge call, Ray start-up (``ray.init``, separate), peak RSS of the driver and of each Ray worker
(VmHWM from /proc), and the Ray overhead per task = (Ray 1 worker − local) / tasks.  A no-op task
round trip is timed too (the scheduling floor).  The outputs are compared byte for byte.

Usage: .venv/bin/python evals/bench/ray_bench.py --adapters 64 256 --out evals/bench/RESULTS-ray.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from synthetic import make_adapters

CHILD = r"""
import json, os, sys, time, resource
from pathlib import Path
cfg = json.loads(sys.argv[1])
from mergekit_lora.options import MergeOptions
from mergekit_lora.pipeline import MergeRequest, execute, plan
res = {"ray_init_s": 0.0}
stream = None
if cfg["workers"]:
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=cfg["workers"], include_dashboard=False, log_to_driver=False, configure_logging=False)
    res["ray_init_s"] = time.perf_counter() - t
    @ray.remote(num_cpus=1)
    def noop():
        return None
    ray.get([noop.remote() for _ in range(20)])  # workers up before timing
    t = time.perf_counter()
    for _ in range(50):
        ray.get(noop.remote())
    res["noop_roundtrip_ms"] = (time.perf_counter() - t) / 50 * 1e3
    from mergekit_lora.distributed.ray_merge import RayOptions, ray_stream
    stream = ray_stream(RayOptions(workers=cfg["workers"], modules_per_task=cfg["modules_per_task"]))
t = time.perf_counter()
opts = MergeOptions(out=cfg["out"], device="cpu", force=True)
r = execute(plan(MergeRequest(sources=cfg["paths"], method=cfg["method"], params=cfg["params"], options=opts)), stream)
res["merge_s"] = time.perf_counter() - t
res["modules"] = r.modules
res["driver_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if cfg["workers"]:
    import psutil
    workers, system = [], 0.0
    for p in psutil.process_iter(["cmdline", "pid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] == os.getpid():
            continue
        try:
            hwm = [l for l in open(f"/proc/{p.info['pid']}/status") if l.startswith("VmHWM")]
        except OSError:
            continue
        mb = int(hwm[0].split()[1]) / 1024 if hwm else 0.0
        if cmd.startswith("ray::") and "Agent" not in cmd:  # task workers (ray::IDLE once their task is done)
            workers.append(mb)
        elif any(s in cmd for s in ("raylet", "gcs_server", "ray/dashboard", "log_monitor", "monitor.py")):
            system += mb
    res["worker_peak_mb"] = sorted(workers, reverse=True)[: cfg["workers"]]
    res["ray_system_mb"] = system
    ray.shutdown()
print("RESULT " + json.dumps(res))
"""


def run_child(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return f"{os.cpu_count()} CPU cores ({cpu}), load average {load:.1f} at start, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="linear")
    ap.add_argument("--params", default='{"rank": 16}')
    ap.add_argument("--modules-per-task", type=int, default=8)
    ap.add_argument("--work", default="/tmp/ray_bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    head = machine()
    for n in args.adapters:
        paths = make_adapters(work / f"L{args.layers}-h{args.hidden}-r{args.rank}", n, args.layers, args.hidden,
                             args.intermediate, args.rank)
        size = sum((p / "adapter_model.safetensors").stat().st_size for p in paths) / 2**20
        outs = {}
        for workers in (0, 1, 2):
            out = work / f"out-{n}-{workers}"
            cfg = {"paths": [str(p) for p in paths], "method": args.method, "params": json.loads(args.params),
                   "out": str(out), "workers": workers, "modules_per_task": args.modules_per_task}
            r = run_child(cfg)
            outs[workers] = (out / "adapter_model.safetensors").read_bytes()
            r.update(adapters=n, workers=workers, input_mb=size)
            rows.append(r)
            print(json.dumps(r), flush=True)
        assert outs[0] == outs[1] == outs[2], "Ray output differs from the local merge"
    tasks = lambda r: -(-r["modules"] // args.modules_per_task)  # noqa: E731
    lines = [
        "# `merge --ray` on a synthetic adapter library",
        "",
        f"    {' '.join(['.venv/bin/python', *sys.argv])}",
        "",
        f"Machine: {head}. Layout: {args.layers} layers × 7 projections = {args.layers * 7} modules, hidden "
        f"{args.hidden}, intermediate {args.intermediate}, rank {args.rank} (fp32); method `{args.method}` "
        f"{args.params}; {args.modules_per_task} modules per Ray task. Each run is a fresh process; the three "
        "outputs of each library size are byte-identical (checked).",
        "",
        "| adapters | inputs MB | run | merge s | Ray start s | no-op task ms | overhead / task ms | driver peak MB | "
        "worker peak MB | Ray system MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        local = next(x for x in rows if x["adapters"] == r["adapters"] and x["workers"] == 0)
        over = ((r["merge_s"] - local["merge_s"]) / tasks(r) * 1e3) if r["workers"] == 1 else None
        run = "local" if not r["workers"] else f"Ray, {r['workers']} worker(s)"
        lines.append(
            f"| {r['adapters']} | {r['input_mb']:.0f} | {run} "
            f"| {r['merge_s']:.2f} | {r['ray_init_s']:.2f} | {r.get('noop_roundtrip_ms', 0):.2f} | "
            f"{'' if over is None else f'{over:.0f}'} | {r['driver_peak_mb']:.0f} | "
            f"{', '.join(f'{x:.0f}' for x in r.get('worker_peak_mb', [])) or '–'} | {r.get('ray_system_mb', 0):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
