"""``faiss.Kmeans`` per point set, from the shared seeds; on the GPU when the device is CUDA (faiss-gpu)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import LoraMergeError
from .torch_backend import initial_centres


def make_lloyd(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    import faiss

    use_gpu = device.type == "cuda"
    if use_gpu and (not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0):
        raise LoraMergeError("«backend» faiss on CUDA needs faiss-gpu (pip install -e '.[gpu]' in the clone); "
                             "use «backend» torch or «device» cpu")

    def lloyd(X: torch.Tensor, K: torch.Tensor, init: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
        Xn = np.ascontiguousarray(X.detach().float().cpu().numpy())
        Cn = np.ascontiguousarray(initial_centres(X, init).float().cpu().numpy())
        M, N, D = Xn.shape
        k = Cn.shape[1]
        labels = np.empty((M, N), dtype=np.int64)
        inertia = np.empty(M, dtype=np.float64)
        for m in range(M):
            km = faiss.Kmeans(D, k, niter=max_iter, seed=1234, verbose=False, gpu=use_gpu,
                              min_points_per_centroid=1, max_points_per_centroid=1 << 30)
            km.train(Xn[m], init_centroids=Cn[m])
            dist, lab = km.index.search(Xn[m], 1)
            labels[m] = lab[:, 0]
            inertia[m] = float(dist.sum())
        return torch.from_numpy(labels), torch.from_numpy(inertia)

    return lloyd
