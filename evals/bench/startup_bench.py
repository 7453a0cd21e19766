"""Benchmark: CPU seconds (user + sys) of whole ``loramerge`` processes that should not need torch.

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

CLI = [sys.executable, "-m", "mergekit_lora.cli.main"]
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
    ("`loramerge inspect examples/tiny-llama-shift/adapter_model.safetensors` (a lone file: torch path)",
     [*CLI, "inspect", "examples/tiny-llama-shift/adapter_model.safetensors"], None),
]


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
