"""Benchmark `merge --ray` against the local driver on synthetic adapter libraries (not a test).

Writes N synthetic rank-r PEFT adapters (Llama-like layout: per layer q,k,v,o hidden×hidden; gate, up
intermediate×hidden; down hidden×intermediate) and merges all of them, every run a fresh driver
process (what a `loramerge merge` call is), in one alternating sequence per library size:

- ``local 1t`` / ``local 2t``: the local driver with a thread budget of 1 / 2;
- ``ray call``: `--ray` with a local Ray started by the call (and shut down after it), 2 workers;
- ``cluster cold`` / ``cluster warm``: `--ray-address` joining a running 2-CPU head (started by this
  script, before the runs) — the first call starts the merge workers, the next finds them warm.

Reported per run: wall seconds of plan + execute (Ray start included), CPU seconds of the driver's
whole process tree (Ray's own processes when the call started Ray) plus the merge workers' CPU for
cluster runs (their processes belong to the head), Ray start, workers reused, tasks, and the load
average before and after.  With ``--repeats R`` the sequence runs R times and the fastest wall of
each run kind is reported.  All outputs of a library size are compared byte for byte.

Usage: OMP_NUM_THREADS=1 .venv/bin/python evals/bench/ray_bench.py --adapters 2 64 256 --out evals/bench/RESULTS-ray.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import ray
import torch
from synthetic import make_adapters

sys.path.insert(0, str(Path(__file__).parents[2] / "tests"))
from ray_head import head_env, start_head  # noqa: E402  (the tests' own-head helper: start, stop exactly its processes)

CHILD = r"""
import json, sys, time, resource
t0 = time.perf_counter()
cfg = json.loads(sys.argv[1])
from mergekit_lora.options import MergeOptions
from mergekit_lora.pipeline import MergeRequest, execute, plan
stream = None
if cfg["ray"]:
    from mergekit_lora.distributed.ray_merge import RayOptions, ray_stream
    stream = ray_stream(RayOptions(address=cfg["address"], workers=cfg["workers"]))
t = time.perf_counter()
opts = MergeOptions(out=cfg["out"], device="cpu", force=True, threads=cfg["threads"])
r = execute(plan(MergeRequest(sources=cfg["paths"], method=cfg["method"], params=cfg["params"], options=opts)), stream)
res = {"merge_s": time.perf_counter() - t, "process_s": time.perf_counter() - t0, "modules": r.modules,
       "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if stream is not None:
    res.update(stream.stats.__dict__)
print("RESULT " + json.dumps(res))
"""

KINDS = {  # run kind -> (Ray?, join the head?, thread budget)
    "local 1t": (False, False, 1),
    "ray call": (True, False, 1),
    "local 2t": (False, False, 2),
    "cluster cold": (True, True, 1),
    "cluster warm": (True, True, 1),
}


def run_child(cfg: dict, env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"child failed ({p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(line[0][7:])
    tree = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res.update(process_wall_s=wall, tree_cpu_s=tree, load_before=load0, load_after=os.getloadavg()[0])
    return res


def cpu_s(r: dict) -> float:
    """The run's CPU seconds: the driver's process tree plus the merge workers (never reaped into the tree)."""
    return r["tree_cpu_s"] + r.get("worker_cpu_s", 0.0)


def release_pool(address: str) -> None:
    """Retire the head's warm workers (the next 'cluster cold' run starts them again)."""
    code = ("import ray; from mergekit_lora.distributed.merge_pool import release_kept; "
            f"ray.init(address={address!r}, include_dashboard=False, log_to_driver=False, configure_logging=False); "
            "release_kept(ray); ray.shutdown()")
    subprocess.run([sys.executable, "-c", code], env=head_env(), check=True, capture_output=True)


def render(rows: list[dict]) -> str:
    """The markdown table: per library size and run kind, the fastest repeat."""
    best = {}
    for r in rows:
        k = (r["adapters"], r["kind"])
        if k not in best or r["merge_s"] < best[k]["merge_s"]:
            best[k] = r
    lines = [
        "| adapters | inputs MB | run | wall s | CPU s | vs local 1t (wall) | Ray start s | first result s "
        "| workers (reused) | tasks | load before → after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, kind), r in best.items():
        base = best[(n, "local 1t")]["merge_s"] if (n, "local 1t") in best else float("nan")
        ray_cols = (f"{r['ray_start_s']:.2f} | {r['first_result_s']:.2f} | {r['workers']} ({r['reused']}) | {r['tasks']}"
                    if "workers" in r else "– | – | – | –")
        lines.append(f"| {n} | {r['input_mb']:.0f} | {kind} | {r['merge_s']:.2f} | {cpu_s(r):.1f} | "
                     f"{base / r['merge_s']:.2f}× | {ray_cols} | {r['load_before']:.1f} → {r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, nargs="+", default=[2, 64, 256])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="linear")
    ap.add_argument("--params", default='{"rank": 16}')
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS), help="run kinds, in this order")
    ap.add_argument("--work", default="/tmp/ray_bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--from-json", default=None, help="only print the table of a previous run's rows")
    args = ap.parse_args()
    if args.from_json:
        print(render(json.loads(Path(args.from_json).read_text())))
        return
    work = Path(args.work)
    env = {**head_env(), "OMP_NUM_THREADS": "1"}
    rows = []
    head_gen = start_head(2)
    address = next(head_gen)
    try:
        for n in args.adapters:
            paths = make_adapters(work / f"L{args.layers}-h{args.hidden}-r{args.rank}", n, args.layers, args.hidden,
                                 args.intermediate, args.rank)
            size = sum((p / "adapter_model.safetensors").stat().st_size for p in paths) / 2**20
            outs: dict[str, bytes] = {}
            for rep in range(args.repeats):
                release_pool(address)
                for kind in args.kinds:
                    use_ray, join, threads = KINDS[kind]
                    out = work / f"out-{n}-{kind.replace(' ', '-')}"
                    cfg = {"paths": [str(p) for p in paths], "method": args.method, "params": json.loads(args.params),
                           "out": str(out), "ray": use_ray, "address": address if join else None, "workers": 2,
                           "threads": threads}
                    r = run_child(cfg, env)
                    outs[kind] = (out / "adapter_model.safetensors").read_bytes()
                    r.update(adapters=n, kind=kind, input_mb=size, repeat=rep)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            assert len(set(outs.values())) == 1, "a Ray output differs from the local merge"
    finally:
        next(head_gen, None)
    assert not ray.is_initialized()
    head = (f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
            f"{torch.__version__}, Ray {ray.__version__}. Layout: {args.layers} layers × 7 projections = "
            f"{args.layers * 7} modules, hidden {args.hidden}, intermediate {args.intermediate}, rank {args.rank} "
            f"(fp32); method `{args.method}` {args.params}; fastest of {args.repeats} alternating sequence(s).")
    text = "\n".join([f"    OMP_NUM_THREADS=1 {' '.join(['.venv/bin/python', *sys.argv])}", "", head, "", render(rows)])
    print(text)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        Path(args.out).with_suffix(".table.md").write_text(text)


if __name__ == "__main__":
    main()
