"""Bytes that do not depend on the number of CPU threads.

MKL's LAPACK routines (``geqrf``/``orgqr`` behind ``torch.linalg.qr``, ``gesdd`` behind
``torch.linalg.svd``) block their work by the thread count, so the same QR or SVD with 1 and with 2
threads differs in the last bits, and a merge that refactors with them wrote different bytes under
``OMP_NUM_THREADS=1`` and 2.  MKL's GEMM does the same for skinny outputs: ``[4096, 4096] @ [4096, 24]``
gives identical bits for 1 and 2 threads but not for 4 or 8 (it splits the inner dimension), while
products with a wide output (``[24, 4096] @ [4096, 4096]``, ``B @ A`` with inner dimension r) were
identical for 1, 2, 4 and 8 threads.  So :func:`one_thread` runs the randomised SVD (its skinny
products, QRs and small SVD) and the factor-space QRs with one intra-op thread on the CPU; forming
dense ΔW keeps every thread.  ``tests/test_determinism.py`` checks every method end to end in
separate processes at 1 and 2 threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with one intra-op CPU thread (restored after); a no-op for CUDA tensors."""
    n = torch.get_num_threads()
    if torch.device(device).type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def qr_q(x: torch.Tensor) -> torch.Tensor:
    """The Q of a reduced QR, thread-count independent on the CPU."""
    with one_thread(x.device):
        return torch.linalg.qr(x).Q


def svd_lowrank(a: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank(a, q, niter)`` (Halko et al. 2009, Alg. 5.1) step for step — the same random
    draw from the global generator, the same products, bit-identical to it on one thread — run on one
    CPU thread whatever the thread setting.

    a: [m, n] real; returns U [m, q], S [q], V [n, q].
    """
    with one_thread(a.device):
        return _svd_lowrank(a, q, niter)


def _svd_lowrank(a: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = a.shape
    tall = m >= n
    x = a if tall else a.mH
    r = torch.randn(x.shape[-1], q, dtype=x.dtype, device=x.device)
    basis = qr_q(x @ r)
    for _ in range(niter):
        basis = qr_q(x.mH @ basis)
        basis = qr_q(x @ basis)
    b = basis.mH @ x
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    v = vh.mH
    u = basis @ u
    return (u, s, v) if tall else (v, s, u)
