"""``tune.png``: every trial's objective (dots) and the best so far (line) against the trial number."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_convergence(rows: list[dict[str, Any]], path: Path, metric: str = "loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, best_x, best_y, failed = [], [], [], [], []
    best = None
    for r in rows:
        if r["score"] is None:
            failed.append(r["trial"])
            continue
        xs.append(r["trial"])
        ys.append(r["score"])
        best = r["score"] if best is None else min(best, r["score"])
        best_x.append(r["trial"])
        best_y.append(best)
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.scatter(xs, ys, s=12, alpha=0.5, label="trial")
    ax.step(best_x, best_y, where="post", color="C3", label="best so far")
    if failed:
        ax.scatter(failed, [max(ys or [0])] * len(failed), marker="x", color="k", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective ({'loss' if metric == 'loss' else '−accuracy'} + L1), lower is better")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
