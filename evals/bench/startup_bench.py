"""Benchmark: CPU seconds (user + sys) of whole ``loramerge`` processes that should not need torch.

Start-up, ``inspect`` of every single-file format, plan-stage errors of each stage and the torch-free
``linear``/``cat`` merges (issue 25: each error and each inspect ≤ 0.5 CPU s).

Each row is one command line, run as its own process (``python -m mergekit_lora.cli.main ARGS``,
stdout to /dev/null) — the same figure as ``/usr/bin/time -f "%U %S"`` — in rounds, so the rows
interleave; the table shows the fastest of ``--repeat`` per row.  CPU time rather than wall time,
because wall time on a shared machine says more about the neighbours.  Run from the repository root:

    python evals/bench/startup_bench.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CLI = [sys.executable, "-m", "mergekit_lora.cli.main"]
WORK = Path(tempfile.gettempdir()) / "loramerge-startup-bench"  # kohya/diffusers files and outputs
S = ["examples/suite/topic", "examples/suite/genre"]
# (label, argv, goal in CPU s or None)
ROWS: list[tuple[str, list[str], float | None]] = [
    ('`python -c "import typer"` (reference)', [sys.executable, "-c", "import typer"], None),
    ('`python -c "import torch"` (reference)', [sys.executable, "-c", "import torch"], None),
    ("`loramerge --help`", [*CLI, "--help"], 0.5),
    ("`loramerge --version`", [*CLI, "--version"], 0.5),
    ("`loramerge merge` (usage error: no inputs)", [*CLI, "merge"], 0.5),
    ("`loramerge merge --help`", [*CLI, "merge", "--help"], 0.5),
    ("`loramerge methods`", [*CLI, "methods"], 0.5),
    ("`loramerge inspect examples/tiny-llama-shift`", [*CLI, "inspect", "examples/tiny-llama-shift"], 1.0),
    ("`loramerge inspect examples/suite/r16/region` (120 modules, f16, 3.6 MB)",
     [*CLI, "inspect", "examples/suite/r16/region"], None),
    ("`loramerge inspect examples/tiny-llama-shift/adapter_model.safetensors` (a lone file)",
     [*CLI, "inspect", "examples/tiny-llama-shift/adapter_model.safetensors"], 0.5),
    ("`loramerge inspect kohya.safetensors` (SD 1.5 UNet names, 64 modules, f16)",
     [*CLI, "inspect", str(WORK / "kohya.safetensors")], 0.5),
    ("`loramerge inspect diffusers.safetensors` (64 modules, f16)", [*CLI, "inspect", str(WORK / "diffusers.safetensors")],
     0.5),
    ("`loramerge inspect x.gguf` (refused: a GGUF is not an input)", [*CLI, "inspect", str(WORK / "x.gguf")], 0.5),
    ("plan error, stage 1: `merge A B -m tiess`", [*CLI, "merge", *S, "-m", "tiess"], 0.5),
    ("plan error, stage 1: `merge A B --weights 1,2,3`", [*CLI, "merge", *S, "--weights", "1,2,3"], 0.5),
    ("plan error, stage 1: `merge A B -o EXISTING`", [*CLI, "merge", *S, "-o", "examples"], 0.5),
    ("plan error, stage 2: `merge A B/typo`", [*CLI, "merge", S[0], S[1] + "x"], 0.5),
    ("plan error, stage 3: `merge A TINY` (two base models)", [*CLI, "merge", S[0], "examples/tiny-llama-double"], 0.5),
    ("plan error, stage 1: `merge A B --dtype fp8`", [*CLI, "merge", *S, "--dtype", "fp8"], 0.5),
    ("plan error, stage 3, a method that computes: `merge A TINY -m ties` (its class loads after the checks)",
     [*CLI, "merge", S[0], "examples/tiny-llama-double", "-m", "ties"], 0.5),
    ("plan error, stage 1, a method that computes: `merge A B -m ties --density 2`",
     [*CLI, "merge", *S, "-m", "ties", "--density", "2"], 0.5),
    ("plan error, stage 3, output format: `merge A B -m svd --format gguf -o OUT` (no --base-gguf)",
     [*CLI, "merge", *S, "-m", "svd", "--format", "gguf", "-o", str(WORK / "never")], 0.5),
    ("`loramerge merge A B -m linear -o OUT` (SmolLM2, 2 × r8, written)",
     [*CLI, "merge", *S, "-m", "linear", "-o", str(WORK / "linear"), "--force"], None),
    ("`loramerge merge A B -m cat -o OUT`", [*CLI, "merge", *S, "-m", "cat", "-o", str(WORK / "cat"), "--force"], None),
]


def sd_files() -> None:
    """A kohya and a diffusers file (f16, 32 UNet projections each of 320/640 channels, rank 8)."""
    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kohya, diffusers = {}, {}
    for b in range(4):
        for proj in ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_2", "ff_net_0_proj"):
            d = 320 if b < 2 else 640
            down, up = (rng.standard_normal((8, d)) * 0.1).astype(np.float16), (rng.standard_normal((d, 8)) * 0.1).astype(np.float16)
            k = f"lora_unet_down_blocks_{b // 2}_attentions_{b % 2}_{proj}"
            kohya[f"{k}.lora_down.weight"], kohya[f"{k}.lora_up.weight"] = down, up
            kohya[f"{k}.alpha"] = np.array(4.0, np.float32)
            m = f"unet.down_blocks.{b // 2}.attentions.{b % 2}.{proj.replace('_0', '.0').replace('ff_net', 'ff.net')}"
            diffusers[f"{m}.lora_A.weight"], diffusers[f"{m}.lora_B.weight"] = down, up
    save_file(kohya, str(WORK / "kohya.safetensors"))
    save_file(diffusers, str(WORK / "diffusers.safetensors"))
    (WORK / "x.gguf").write_bytes(b"GGUF" + bytes(60))


def cpu_seconds(argv: list[str]) -> float:
    """User + system CPU seconds of one child process (its own rusage, from wait4)."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    sd_files()
    best = {label: float("inf") for label, _, _ in ROWS}
    for _ in range(a.repeat):
        for label, argv, _ in ROWS:
            best[label] = min(best[label], cpu_seconds(argv))
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {os.cpu_count()} CPUs, fastest of {a.repeat}\n")
    print("| command | CPU s | goal | |\n|---|---|---|---|")
    for label, _, goal in ROWS:
        verdict = "" if goal is None else ("met" if best[label] <= goal else "**not met**")
        print(f"| {label} | {best[label]:.2f} | {'–' if goal is None else f'≤ {goal}'} | {verdict} |")


if __name__ == "__main__":
    main()
