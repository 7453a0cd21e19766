"""The library's clusters: k-means on the weight signatures and a 2-D picture of them (PCA, coloured by cluster).

``clusters`` groups the catalogued adapters by signature (the project's seeded k-means, Euclidean on the unit
signatures, i.e. by cosine); ``plot_clusters`` draws the first two principal components of the signatures,
one colour per cluster, and writes a PNG atomically (a temporary file moved into place).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LoraMergeError
from ..kmeans import kmeans
from ..pipeline.output import output_file


def default_k(n: int) -> int:
    """≈ √(n/2) clusters, at least 1, at most 12 (a picture stays readable)."""
    return max(1, min(12, n, round(math.sqrt(n / 2))))


def clusters(vecs: np.ndarray, k: int | None = None, seed: int = 0) -> np.ndarray:
    """labels [n] int64 in [0, k): k-means of the signatures [n, dim] (seeded, deterministic)."""
    n = vecs.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = default_k(n) if k is None else k
    if k < 1:
        raise LoraMergeError(f"--clusters must be at least 1 (got {k})", field="clusters")
    res = kmeans(torch.from_numpy(np.asarray(vecs, dtype=np.float64))[None], min(k, n),
                 generators=[torch.Generator().manual_seed(seed)])
    labels = res.labels[0].numpy().astype(np.int64)
    _, relabel = np.unique(labels, return_inverse=True)  # empty clusters dropped: labels 0..k'-1
    return relabel.astype(np.int64)


def project_2d(vecs: np.ndarray) -> np.ndarray:
    """[n, 2]: the signatures on their first two principal components (fewer points: zeros fill in)."""
    X = np.asarray(vecs, dtype=np.float64)
    out = np.zeros((X.shape[0], 2))
    if X.shape[0] < 2:
        return out
    Xc = X - X.mean(0)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    p = U[:, :2] * S[:2]
    out[:, :p.shape[1]] = p
    return out


def plot_clusters(names: list[str], vecs: np.ndarray, labels: np.ndarray, path: str | Path,
                  title: str = "") -> dict[str, Any]:
    """Write the PNG at ``path``; returns {"path", "clusters", "points"}.  Points are labelled when n <= 40."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise LoraMergeError(f"--plot {path}: give a .png file name", field="plot")
    if not path.parent.is_dir():
        raise LoraMergeError(f"--plot {path}: the folder {path.parent} does not exist", field="plot")
    xy = project_2d(vecs)
    if not np.isfinite(xy).all():
        raise LoraMergeError("the signatures' projection is not finite; re-index the library")
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
    cmap = plt.get_cmap("tab20" if labels.max(initial=0) >= 10 else "tab10")
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=18, color=cmap(int(c) % cmap.N), label=f"cluster {c} ({int(m.sum())})")
    if len(names) <= 40:
        for (x, y), n in zip(xy, names):
            ax.annotate(n, (x, y), fontsize=6, alpha=0.8, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("signature PC 1")
    ax.set_ylabel("signature PC 2")
    ax.set_title(title or f"{len(names)} adapters by weight signature", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with output_file(path, force=True) as tmp:  # replaced atomically, as every output
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return {"path": str(path), "clusters": int(len(np.unique(labels))), "points": len(names)}
