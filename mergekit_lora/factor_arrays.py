"""Rank units as numpy arrays: the factor operations of the concatenating methods, without torch.

:class:`ArrayUnits` has the fields of :class:`~mergekit_lora.units.RankUnits` and the part of its API
that only moves and scales factors (``from_factors``, ``scaled``, ``concat``, ``with_factors``, shapes),
with the same arithmetic in the same precision, so a method written against that part (``linear``,
``cat``: ``Algorithm.runs_on_arrays``) gives the same bits on either.  Geometry (Grams, SVDs) stays on
``RankUnits``; :meth:`ArrayUnits.to_units` hands a module over when torch is wanted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from .arrays import Stored, store

if TYPE_CHECKING:
    from .units import RankUnits

ModuleKind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True)
class ArrayUnits:
    """One module's units: ``A`` [r, d_in], ``B`` [d_out, r] (scale folded in), ``source`` [r] int64;
    float32 or float64 arrays, as :class:`RankUnits` holds them."""

    A: np.ndarray
    B: np.ndarray
    source: np.ndarray
    weight_shape: tuple[int, ...]
    kind: ModuleKind = "linear"
    fan_in_fan_out: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"ArrayUnits needs A [r, d_in] and B [d_out, r], got A{self.A.shape} B{self.B.shape}")

    @classmethod
    def from_factors(cls, A: np.ndarray, B: np.ndarray, *, scale: float = 1.0, source: int = 0,
                     weight_shape: tuple[int, ...] | None = None, kind: ModuleKind = "linear",
                     fan_in_fan_out: bool = False) -> ArrayUnits:
        """As :meth:`RankUnits.from_factors`: conv kernels flattened, ``scale`` multiplied into B in its dtype."""
        r = A.shape[0]
        A2 = A.reshape(r, -1)
        B2 = B.reshape(B.shape[0], r) if B.ndim > 2 else B
        if scale != 1.0:
            B2 = B2 * B2.dtype.type(scale)
        shape = tuple(weight_shape) if weight_shape is not None else (B2.shape[0], A2.shape[1])
        return cls(A2, B2, np.full((r,), int(source), dtype=np.int64), shape, kind, fan_in_fan_out)

    def with_factors(self, A: np.ndarray, B: np.ndarray, source: np.ndarray | None = None) -> ArrayUnits:
        if source is None:
            source = self.source if A.shape[0] == self.rank else np.zeros(A.shape[0], dtype=np.int64)
        return replace(self, A=A, B=B, source=source)

    def tagged(self, source: int) -> ArrayUnits:
        """Every unit marked as coming from input ``source``."""
        return replace(self, source=np.full((self.rank,), int(source), dtype=np.int64))

    @staticmethod
    def concat(parts: Sequence[ArrayUnits]) -> ArrayUnits:
        """[B_1 … B_n][A_1; …; A_n] = Σ B_j A_j, in the widest of the parts' dtypes."""
        if not parts:
            raise ValueError("concat needs at least one ArrayUnits")
        first = parts[0]
        for p in parts[1:]:
            if p.d_out != first.d_out or p.d_in != first.d_in or p.kind != first.kind:
                raise ValueError(f"cannot concatenate units of shape {p.weight_shape} ({p.kind}) "
                                 f"with {first.weight_shape} ({first.kind})")
        dtype = np.result_type(*[x for p in parts for x in (p.A, p.B)])
        A = np.concatenate([p.A.astype(dtype, copy=False) for p in parts], 0)
        B = np.concatenate([p.B.astype(dtype, copy=False) for p in parts], 1)
        return replace(first, A=A, B=B, source=np.concatenate([p.source for p in parts]))

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    def num_params(self) -> int:
        return int(self.A.size + self.B.size)

    def scaled(self, w: float) -> ArrayUnits:
        """w · ΔW (scales B, in B's dtype, as torch multiplies a tensor by a Python number)."""
        return replace(self, B=self.B * self.B.dtype.type(w))

    def norm(self) -> float:
        """‖ΔW‖_F = sqrt(tr(BᵀB · AAᵀ)) in float64, without forming ΔW."""
        a, b = self.A.astype(np.float64), self.B.astype(np.float64)
        return float(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0) ** 0.5)

    def stored(self, dtype: str) -> tuple[Stored, Stored]:
        """(A, B) rounded to ``dtype`` for a file; rank 0 becomes one zero unit (PEFT cannot hold rank 0)."""
        A, B = self.A, self.B
        if self.rank == 0:
            A, B = np.zeros((1, self.d_in), A.dtype), np.zeros((self.d_out, 1), B.dtype)
        return store(A, dtype), store(B, dtype)

    def to_units(self) -> RankUnits:
        """The same module as torch :class:`RankUnits` (imports torch)."""
        import torch  # lazily: the array path exists to run without torch

        from .units import RankUnits

        return RankUnits(torch.from_numpy(np.ascontiguousarray(self.A)), torch.from_numpy(np.ascontiguousarray(self.B)),
                         torch.from_numpy(self.source), self.weight_shape, self.kind, self.fan_in_fan_out)
