"""Batched k-means over many same-shape point sets, behind one interface with three backends.

``kmeans(X, k, generators=...)`` clusters every ``X[m]`` (``X`` is [M, N, D]: M modules, N points
each) into ``k`` clusters and returns the labels [M, N]; ``kmeans_gram(K, ...)`` does the same from
the Gram matrices K = X Xᵀ alone (what LoRA-LEGO has: N ~ 100 points in D ~ 10⁴ dimensions).  Every
backend starts from the same seeded k-means++ seeds (drawn here, one ``torch.Generator`` per module,
so a module's result does not depend on which other modules share its batch) and runs Lloyd's
algorithm; ``n_init`` restarts keep the lowest-inertia run (first on ties).  Backends: ``torch``
(batched, on the Gram, CPU or CUDA), ``faiss`` (``faiss.Kmeans``; GPU with faiss-gpu), ``sklearn``
(``KMeans``, the CPU reference); the last two get coordinates with the same distances as the points.

``sign_invariant``: x and −x are the same point (a rank unit b aᵀ = (−b)(−a)ᵀ), so the distance is
min(‖x − c‖, ‖−x − c‖) (``signs.py``); the result then carries each point's sign in its cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import LoraMergeError
from .seeding import embed, gram, kmeans_pp
from .signs import flip_step

BACKENDS = ("torch", "faiss", "sklearn")
# (X [M,N,D] or None, K = X Xᵀ [M,N,N], init: seed indices [M,k] or centre weights [M,N,k], max_iter)
#   -> (labels [M,N], inertia [M])
Lloyd = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
MAX_SIGN_ROUNDS = 50


@dataclass(frozen=True)
class KMeansResult:
    labels: torch.Tensor  # [M, N] int64 on CPU, values in [0, k)
    inertia: torch.Tensor  # [M] float64: Σ squared distance of each point to its centre
    backend: str
    signs: torch.Tensor | None = None  # [M, N] ±1 (CPU): the sign each point enters its cluster with

    def signs_or_ones(self) -> torch.Tensor:
        return self.signs if self.signs is not None else torch.ones(self.labels.shape, dtype=torch.float64)


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
           n_init: int = 1, max_iter: int = 100, device: torch.device | None = None,
           sign_invariant: bool = False) -> KMeansResult:
    """Cluster each of the M point sets of ``X`` [M, N, D] into ``k`` clusters.

    ``k >= N`` puts every point in its own cluster (exact); ``k = 1`` is one cluster.  Duplicate points
    are fine; when a set has fewer distinct points than ``k`` some clusters stay empty (their label is
    never used), which callers must handle.
    """
    if X.ndim != 3:
        raise ValueError(f"kmeans needs X of shape [M, N, D], got {tuple(X.shape)}")
    return kmeans_gram(gram(X), k, generators=generators, backend=backend, n_init=n_init, max_iter=max_iter,
                       device=device or X.device, sign_invariant=sign_invariant, X=X)


def kmeans_gram(K: torch.Tensor, k: int, *, generators: Sequence[torch.Generator], backend: str = "torch",
                n_init: int = 1, max_iter: int = 100, device: torch.device | None = None,
                sign_invariant: bool = False, X: torch.Tensor | None = None) -> KMeansResult:
    """:func:`kmeans` from the Gram matrices K [M, N, N]; ``X`` (optional) are the points themselves,
    else backends that need coordinates get an exact N-dimensional embedding of K."""
    if K.ndim != 3 or K.shape[1] != K.shape[2]:
        raise ValueError(f"kmeans_gram needs K of shape [M, N, N], got {tuple(K.shape)}")
    M, N, _ = K.shape
    if len(generators) != M:
        raise ValueError("kmeans needs one generator per point set")
    if k < 1:
        raise LoraMergeError(f"k must be at least 1 (got {k})")
    device = device or K.device
    if k >= N or N == 0:
        labels = torch.arange(N).expand(M, N).clone()
        return KMeansResult(labels, torch.zeros(M, dtype=torch.float64), backend)
    if k == 1 and not sign_invariant:
        kd = torch.diagonal(K, dim1=1, dim2=2).double()
        inertia = (kd.sum(1) - K.double().sum((1, 2)) / N).clamp_min(0).cpu()
        return KMeansResult(torch.zeros(M, N, dtype=torch.long), inertia, backend)
    lloyd = _lloyd_for(backend, device)
    if backend != "torch" and X is None:
        X = embed(K).to(K.dtype)
    # the n_init restarts run as one batch of n_init·M sets (restart-major): each generator draws its
    # restarts' seeds in the same order as restarts run one after another, and a set that has converged is a
    # fixed point of Lloyd and of the sign step, so the batch gives every restart the result it gets alone
    reps = list(generators) * n_init
    Kr = K.repeat(n_init, 1, 1) if n_init > 1 else K
    Xr = X.repeat(n_init, 1, 1) if X is not None and n_init > 1 else X
    seeds = kmeans_pp(Kr, k, reps, sign_invariant=sign_invariant)
    allr = _run(lloyd, Xr, Kr, seeds, k, max_iter, sign_invariant, backend)
    best: KMeansResult | None = None
    for i in range(n_init):
        part = slice(i * M, (i + 1) * M)
        res = KMeansResult(allr.labels[part], allr.inertia[part], backend,
                           allr.signs[part] if allr.signs is not None else None)
        if best is None:
            best = res
            continue
        better = res.inertia < best.inertia
        best = KMeansResult(torch.where(better[:, None], res.labels, best.labels),
                            torch.where(better, res.inertia, best.inertia), backend,
                            torch.where(better[:, None], res.signs_or_ones(), best.signs_or_ones())
                            if sign_invariant else None)
    assert best is not None
    return best


def _run(lloyd: Lloyd, X: torch.Tensor | None, K: torch.Tensor, seeds: torch.Tensor, k: int, max_iter: int,
         sign_invariant: bool, backend: str) -> KMeansResult:
    """One restart: Lloyd from the seeds; sign-invariant runs alternate Lloyd on the signed points with
    sign flips (``signs.flip_step``) until no point would rather enter its best cluster negated."""
    if not sign_invariant:
        labels, inertia = lloyd(X, K, seeds, max_iter)
        return KMeansResult(labels.cpu(), inertia.double().cpu(), backend)
    M, N, _ = K.shape
    s = torch.ones(M, N, dtype=K.dtype, device=K.device)
    init: torch.Tensor = seeds
    for _ in range(MAX_SIGN_ROUNDS):
        Ks = K * s[:, :, None] * s[:, None, :]
        Xs = X * s[:, :, None].to(X.device, X.dtype) if X is not None else None
        labels, inertia = lloyd(Xs, Ks, init, max_iter)
        labels = labels.to(K.device)
        flip, W = flip_step(Ks, labels, k)
        if not bool(flip.any()):
            break
        s = torch.where(flip, -s, s)
        init = torch.where(flip[:, :, None], -W, W)  # the same centres, in the flipped points' coordinates
    return KMeansResult(labels.cpu(), inertia.double().cpu(), backend, s.double().cpu())


__all__ = ["BACKENDS", "KMeansResult", "embed", "kmeans", "kmeans_gram", "kmeans_pp", "resolve_backend"]
