"""Benchmark `loramerge cluster -k K` (LoRA-LEGO) on synthetic Llama-shaped adapters (not a test).

Writes N synthetic rank-r PEFT adapters with a Llama-7B layout (per layer q,k,v,o: hidden×hidden;
gate, up: intermediate×hidden; down: hidden×intermediate) and times, each in a fresh subprocess:
the I/O floor (read every input tensor with safetensors + write an output of the merged size), the
``cat`` floor (the input files' bytes into one reused buffer, as ``cat`` does), the compute floor
(only the two N×N Gram products per module, N = pooled rank, that exact k-means distances and the
fidelity need), and the lego merge with each k-means backend.  Peak RSS is measured per subprocess; the torch backend is also run at
a second layer count to show whether memory grows with the number of layers.  With ``--repeat N`` every row
runs N times, the rows interleaved (round 1 of every row, then round 2, ...), and each row keeps its fastest
run: on a shared machine, load that comes and goes hits every row alike.  CPU seconds (the child's own,
all threads) are reported next to wall seconds, and each run's × I/O floor in both.  ``--threads 1,2``
runs the lego rows once per thread count (``merge(threads=…)``).  ``--baseline DIR`` also runs the torch row with the code of
another checkout (e.g. ``git archive <commit> | tar -x -C DIR``), interleaved with this one: before/after in
one run.

Full size (the issue's target, ~1.3 GB of fp32 inputs): --layers 32 --hidden 4096 --intermediate 11008.
Usage: .venv/bin/python evals/bench/lego_bench.py --layers 4 --mem-layers 2 --out evals/bench/RESULTS-lego.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from synthetic import make_adapters

FLOOR = """
import sys, time, torch, resource
c0 = time.process_time()
from safetensors import safe_open
from safetensors.torch import save_file
paths, out, k = sys.argv[1].split(','), sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
shapes = {}
for p in paths:
    with safe_open(p + '/adapter_model.safetensors', 'pt') as f:
        for key in f.keys():
            x = f.get_tensor(key)          # read every input tensor (one at a time, as the driver does)
            shapes[key] = x.shape
outt = {key: torch.zeros((k, s[1]) if 'lora_A' in key else (s[0], k)) for key, s in shapes.items()}
save_file(outt, out)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.process_time() - c0)
"""

CAT = """
import sys, time, resource
c0 = time.process_time()
t = time.perf_counter()
buf = bytearray(1 << 20)
for p in sys.argv[1].split(','):
    with open(p + '/adapter_model.safetensors', 'rb', buffering=0) as f:
        while f.readinto(buf):             # what `cat FILE > /dev/null` does: page cache -> one reused buffer
            pass
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.process_time() - c0)
"""

GRAM = """
import sys, time, torch, resource
from safetensors import safe_open
paths = sys.argv[1].split(',')
blocks = {}
with safe_open(paths[0] + '/adapter_model.safetensors', 'pt') as f:
    for key in f.keys():
        if 'lora_A' in key:
            mod = key[: -len('.lora_A.weight')]
            blocks[mod] = (f.get_slice(key).get_shape(), f.get_slice(mod + '.lora_B.weight').get_shape())
n = len(paths)
torch.manual_seed(0)
total = cpu = 0.0
for (r, d_in), (d_out, _) in blocks.values():      # random factors of the pooled shapes, made outside the clock
    A, B = torch.randn(n * r, d_in), torch.randn(d_out, n * r)
    t, c = time.perf_counter(), time.process_time()
    GA, GB = A @ A.T, B.T @ B                         # the two N x N Grams exact k-means distances need
    total += time.perf_counter() - t
    cpu += time.process_time() - c
print(total, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, cpu)
"""

RUN = """
import sys, time, resource
base = sys.argv[7]
if base:  # run another checkout's code: map the package's folders to it before the first import
    import importlib.util
    folders = {'mergekit_lora': 'mergekit_lora'}  # the whole package is one folder

    class BaseFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name in folders:
                d = base + '/' + folders[name]
                return importlib.util.spec_from_file_location(name, d + '/__init__.py', submodule_search_locations=[d])
            return None

    sys.meta_path.insert(0, BaseFinder)
from mergekit_lora import merge
import torch  # noqa: F401  imports excluded: the package loads torch lazily (torch-free planning), so load it here
import mergekit_lora.algorithms.lego.algorithm  # noqa: F401  and the method's modules
import mergekit_lora.formats.peft_write  # noqa: F401
paths, out, k, backend, device = sys.argv[1].split(','), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
threads = int(sys.argv[6]) if sys.argv[6] else None
t, c = time.perf_counter(), time.process_time()
r = merge(paths, 'lego', out, params={'k': k, 'backend': backend}, device=device, force=True, threads=threads)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      time.process_time() - c, r.fidelity['overall']['rel_error'])
"""


def run_rows(jobs: list[tuple[str, str, list[str]]], repeat: int) -> dict[str, list[float]]:
    """Each job (name, code, args) ``repeat`` times in fresh processes, the jobs interleaved; per job the
    child's numbers from its fastest run (the shared machine's noise is one-sided: load only adds time)."""
    best: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, code, args in jobs:
            res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(f"benchmark child {name!r} failed:\n{res.stderr[-3000:]}")
            got = [float(x) for x in res.stdout.strip().splitlines()[-1].split()]
            if name not in best or got[0] < best[name][0]:
                best[name] = got
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--mem-layers", type=int, default=2, help="second layer count for the peak-RSS comparison")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--backends", default="torch,faiss,sklearn")
    ap.add_argument("--device", default="cpu", help="cpu|cuda|auto (the torch backend batches on CUDA)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lego-bench"))
    ap.add_argument("--out", type=Path, default=None, help="markdown file to write the results to")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes per row (interleaved); the fastest is kept")
    ap.add_argument("--threads", default="", help="merge(threads=...) for the lego rows, comma-separated for a row per "
                                                  "count (default: the thread policy's)")
    ap.add_argument("--baseline", default="", help="another checkout whose code also runs the torch row (before/after)")
    a = ap.parse_args()
    load_before = os.getloadavg()
    rows = []
    for layers in (a.layers, a.mem_layers):
        paths = make_adapters(a.workdir / f"L{layers}-h{a.hidden}", a.adapters, layers, a.hidden, a.intermediate, a.rank)
        size = sum((p / "adapter_model.safetensors").stat().st_size for p in paths) / 2**20
        joined = ",".join(str(p) for p in paths)
        jobs = [("I/O floor", FLOOR, [joined, str(a.workdir / "floor.safetensors"), str(a.k)]),
                ("cat floor (bytes only)", CAT, [joined])]
        if layers == a.layers:
            jobs.append(("Gram floor (compute)", GRAM, [joined]))
        lego = [(b, "") for b in (a.backends.split(",") if layers == a.layers else ["torch"])]
        if a.baseline and layers == a.layers:
            lego.insert(0, ("torch", a.baseline))
        for threads in a.threads.split(","):
            for b, base in lego:
                name = (f"lego, {b} backend" + (f", {threads} thread(s)" if threads else "")
                        + (f" (baseline {a.baseline})" if base else ""))
                out = a.workdir / f"out-{b}-L{layers}-t{threads or 'policy'}{'-base' if base else ''}"
                jobs.append((name, RUN, [joined, str(out), str(a.k), b, a.device, threads, base]))
        best = run_rows(jobs, a.repeat)
        floor_s, floor_cpu = best["I/O floor"][0], best["I/O floor"][2]
        for name, _, _ in jobs:
            got = best[name]
            s, rss, cpu, err = got[0], got[1], got[2], (got[3] if len(got) > 3 else None)
            rows.append((layers, name, s, cpu, rss, err, size))
            print(f"layers={layers} {name}: {s:.2f} s (CPU {cpu:.2f} s, {s / floor_s:.2f}× floor {floor_s:.2f} s, "
                  f"CPU {cpu / floor_cpu:.2f}× floor {floor_cpu:.2f} s), peak RSS {rss:.0f} MiB"
                  + ("" if err is None else f", rel. error {err:.3f}"), flush=True)
    load_after = os.getloadavg()
    lines = [f"# LoRA-LEGO benchmark (`cluster -k {a.k}`)", "",
             f"{a.adapters} synthetic rank-{a.rank} fp32 adapters, Llama layout (q,k,v,o {a.hidden}×{a.hidden}; "
             f"gate,up {a.intermediate}×{a.hidden}; down {a.hidden}×{a.intermediate}); device {a.device} "
             f"({torch.cuda.get_device_name(0) if a.device != 'cpu' and torch.cuda.is_available() else 'CPU'}), "
             f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
             f"n_init 3, max_iter 100, reweight paper, threads {a.threads or 'policy'}.  Floor and lego rows come from this one run.  Each row is the fastest of "
             f"{a.repeat} fresh process(es), rows interleaved; times exclude imports; CPU = the child's CPU seconds "
             f"(all threads).  Load average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in load_before)} before, "
             f"{' / '.join(f'{x:.2f}' for x in load_after)} after.", "",
             "| layers | inputs (MiB) | run | seconds | CPU s | × I/O floor (wall) | × I/O floor (CPU) | peak RSS (MiB) "
             "| rel. error |",
             "|---|---|---|---|---|---|---|---|---|"]
    floors = {r[0]: (r[2], r[3]) for r in rows if r[1] == "I/O floor"}
    for layers, name, s, cpu, rss, err, size in rows:
        fw, fc = floors[layers]
        lines.append(f"| {layers} | {size:.0f} | {name} | {s:.2f} | {cpu:.2f} | {s / fw:.2f} | {cpu / fc:.2f} | "
                     f"{rss:.0f} | {'-' if err is None else f'{err:.3f}'} |")
    lines += ["", f"Command: `{' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
