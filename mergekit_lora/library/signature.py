"""The data-free weight signature of an adapter: a fixed-size float32 vector from its factors alone.

Two parts, each L2-normalised, concatenated with weights √0.9 and √0.1 (so the inner product of two
signatures is ``0.9 · direction cosine + 0.1 · spectrum cosine``):

* **direction** (``SKETCH² = 256`` numbers): a seeded random projection of the whole ΔW.  Every module
  ``m`` has its own fixed Gaussian matrices ``P_m [s, d_out]`` and ``Q_m [s, d_in]`` (seeded from the module
  name and shape), and the sketch is ``Σ_m P_m (ΔW_m / ‖ΔW_m‖) Q_mᵀ``, computed in factor space as
  ``(P_m B)(A Q_mᵀ)``.  By Johnson–Lindenstrauss the cosine of two sketches estimates the cosine of the two
  adapters' (per-module normalised) concatenated ΔW: the signature of "the same update".
* **spectrum** (``TOP_K = 8`` numbers): the mean over modules of the top singular values of ΔW_m
  (:func:`mergekit_lora.lowrank.singular_values`, from the r×r core), each divided by ‖ΔW_m‖ — the shape of
  the update's rank usage, whatever its directions.

Both are functions of ΔW_m = B A only, so they do not change when rank units are reordered, when a unit's
scale is split differently between a and b (a → c·a, b → b/c), or when a unit's sign is flipped; dividing by
‖ΔW_m‖ also makes them blind to the adapter's overall strength (alpha), which the catalogue records apart.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

import numpy as np
import torch

from ..adapter import Adapter
from ..lowrank import singular_values
from ..threads import thread_policy

SKETCH = 16
TOP_K = 8
DIM = SKETCH * SKETCH + TOP_K
VERSION = 1
W_DIRECTION = math.sqrt(0.9)
W_SPECTRUM = math.sqrt(0.1)


@lru_cache(maxsize=4096)
def _projection(name: str, side: str, d: int) -> torch.Tensor:
    """A fixed [SKETCH, d] Gaussian (entries N(0, 1/SKETCH)) for one module's side, seeded by its name."""
    seed = int.from_bytes(hashlib.blake2b(f"{VERSION}:{side}:{name}:{d}".encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    return torch.randn(SKETCH, d, generator=g, dtype=torch.float64) / math.sqrt(SKETCH)


def signature(adapter: Adapter) -> tuple[np.ndarray, float]:
    """(the signature [DIM] float32, ‖ΔW‖ over all modules).  A zero adapter gets a zero vector.

    Runs under the thread policy (single-threaded torch): its products are tiny, and threaded LAPACK on a busy
    machine is both slower (the suite's 12 adapters: 15 s with torch's default threads vs 0.6 s) and not
    bit-stable across thread counts."""
    with thread_policy():
        return _signature(adapter)


def _signature(adapter: Adapter) -> tuple[np.ndarray, float]:
    sketch = torch.zeros(SKETCH, SKETCH, dtype=torch.float64)
    spectrum = torch.zeros(TOP_K, dtype=torch.float64)
    total, counted = 0.0, 0
    for name in adapter.module_names():
        u = adapter.units(name)
        A, B = u.A.double(), u.B.double()  # [r, d_in], [d_out, r] (conv kernels already flattened)
        s = singular_values(u)
        norm = float(s.norm())
        if not math.isfinite(norm) or norm == 0.0:
            continue
        total += norm * norm
        counted += 1
        top = (s[:TOP_K] / norm)
        spectrum[: top.shape[0]] += top
        P = _projection(name, "out", B.shape[0])
        Q = _projection(name, "in", A.shape[1])
        sketch += (P @ B) @ (A @ Q.T) / norm
    if counted == 0:
        return np.zeros(DIM, dtype=np.float32), 0.0
    d = sketch.flatten()
    s = spectrum / counted
    vec = torch.cat([W_DIRECTION * d / d.norm().clamp(min=1e-300), W_SPECTRUM * s / s.norm().clamp(min=1e-300)])
    return vec.float().numpy(), math.sqrt(total)


def parts(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The two cosines behind a score (``score = 0.9·direction + 0.1·spectrum``): the "why" of a match."""
    n = SKETCH * SKETCH
    return {"direction": float(np.dot(a[:n], b[:n]) / (W_DIRECTION ** 2)),
            "spectrum": float(np.dot(a[n:], b[n:]) / (W_SPECTRUM ** 2))}
