"""Batched k-means over many same-shape point sets, behind one interface with three backends.

``kmeans(X, k, generators=...)`` clusters every ``X[m]`` (``X`` is [M, N, D]: M modules, N points
each) into ``k`` clusters and returns the labels [M, N].  Every backend starts from the same seeded
k-means++ seeds (drawn here, one ``torch.Generator`` per module, so a module's result does not
depend on which other modules share its batch) and runs Lloyd's algorithm; ``n_init`` restarts keep
the lowest-inertia run (first on ties).  Backends: ``torch`` (batched, CPU or CUDA), ``faiss``
(``faiss.Kmeans``; GPU with faiss-gpu), ``sklearn`` (``KMeans``, the CPU reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import LoraMergeError
from .seeding import gram, kmeans_pp

BACKENDS = ("torch", "faiss", "sklearn")
# (X [M,N,D], K = X Xᵀ [M,N,N], seed indices [M,k], max_iter) -> (labels [M,N], inertia [M])
Lloyd = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KMeansResult:
    labels: torch.Tensor  # [M, N] int64 on CPU, values in [0, k)
    inertia: torch.Tensor  # [M] float64: Σ squared distance of each point to its centre
    backend: str


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` is ``torch`` everywhere: batched, deterministic, on CUDA when the device is CUDA, and the
    fastest of the three on CPU in our benchmark (evals/bench/RESULTS-lego.md)."""
    if name == "auto":
        return "torch"
    if name not in BACKENDS:
        raise LoraMergeError(f"unknown k-means backend {name!r}; use auto, {', '.join(BACKENDS)}")
    return name


def _lloyd_for(backend: str, device: torch.device) -> Lloyd:
    if backend == "torch":
        from .torch_backend import lloyd

        return lloyd
    if backend == "faiss":
        from .faiss_backend import make_lloyd

        return make_lloyd(device)
    from .sklearn_backend import lloyd as sk_lloyd

    return sk_lloyd


def kmeans(X: torch.Tensor, k: int, *, generators: Sequence[torch.Generator], backend: str = "torch",
           n_init: int = 1, max_iter: int = 100, device: torch.device | None = None) -> KMeansResult:
    """Cluster each of the M point sets of ``X`` [M, N, D] into ``k`` clusters.

    ``k >= N`` puts every point in its own cluster (exact); ``k = 1`` is one cluster.  Duplicate points
    are fine; when a set has fewer distinct points than ``k`` some clusters stay empty (their label is
    never used), which callers must handle.
    """
    if X.ndim != 3:
        raise ValueError(f"kmeans needs X of shape [M, N, D], got {tuple(X.shape)}")
    M, N, _ = X.shape
    if len(generators) != M:
        raise ValueError("kmeans needs one generator per point set")
    if k < 1:
        raise LoraMergeError(f"k must be at least 1 (got {k})")
    device = device or X.device
    if k >= N or N == 0:
        labels = torch.arange(N).expand(M, N).clone()
        return KMeansResult(labels, torch.zeros(M, dtype=torch.float64), backend)
    if k == 1:
        labels = torch.zeros(M, N, dtype=torch.long)
        Xd = X.double()
        inertia = ((Xd - Xd.mean(1, keepdim=True)) ** 2).sum((1, 2)).cpu()
        return KMeansResult(labels, inertia, backend)
    lloyd = _lloyd_for(backend, device)
    K = gram(X)
    best_labels: torch.Tensor | None = None
    best_inertia: torch.Tensor | None = None
    for _ in range(n_init):
        seeds = kmeans_pp(K, k, generators)
        labels, inertia = lloyd(X, K, seeds, max_iter)
        labels, inertia = labels.cpu(), inertia.double().cpu()
        if best_labels is None or best_inertia is None:
            best_labels, best_inertia = labels, inertia
            continue
        better = inertia < best_inertia
        best_labels = torch.where(better[:, None], labels, best_labels)
        best_inertia = torch.where(better, inertia, best_inertia)
    assert best_labels is not None and best_inertia is not None
    return KMeansResult(best_labels, best_inertia, backend)


__all__ = ["BACKENDS", "KMeansResult", "kmeans", "kmeans_pp", "resolve_backend"]
