"""scikit-learn ``KMeans`` (Lloyd) per point set, from the shared seeds: the CPU reference backend."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .torch_backend import initial_centres


def lloyd(X: torch.Tensor, K: torch.Tensor, init: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    Xn = X.detach().double().cpu().numpy()
    Cn = initial_centres(X, init).double().cpu().numpy()
    labels = np.empty(Xn.shape[:2], dtype=np.int64)
    inertia = np.empty(Xn.shape[0], dtype=np.float64)
    for m in range(Xn.shape[0]):
        km = KMeans(n_clusters=Cn.shape[1], init=Cn[m], n_init=1, max_iter=max_iter, tol=0.0,
                    algorithm="lloyd", random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k: handled by callers
            km.fit(Xn[m])
        labels[m] = km.labels_
        inertia[m] = km.inertia_
    return torch.from_numpy(labels), torch.from_numpy(inertia)
