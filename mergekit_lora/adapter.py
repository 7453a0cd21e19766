"""An adapter: ordered module name -> rank units, loaded lazily one module at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .arrays import dtype_name
from .errors import LoraMergeError

if TYPE_CHECKING:  # the header side (ModuleInfo, AdapterMeta, plans) needs no torch; units are loaded on demand
    import torch

    from .factor_arrays import ArrayUnits
    from .units import RankUnits

ModuleKind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True)
class ModuleInfo:
    """What the file header says about one module; reading it loads no tensor data."""

    name: str
    rank: int
    d_out: int
    d_in: int
    weight_shape: tuple[int, ...]
    kind: ModuleKind
    fan_in_fan_out: bool
    alpha: float
    scale: float
    dtype: str  # the factors' dtype as stored: "bfloat16", "float32", … (arrays.dtype_name)


@dataclass
class AdapterMeta:
    """Adapter-wide facts carried from input to output."""

    format: str  # "peft", "kohya", "diffusers", "memory", ...
    base_model: str | None = None
    revision: str | None = None
    task_type: str | None = None
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    dtype: str = "float32"  # as ModuleInfo.dtype
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """Module name -> :class:`RankUnits`, with metadata.

    Readers give an :class:`Adapter` whose ``loader`` reads one module's tensors on demand (byte
    ranges of a header validated by ``safetensors.safe_open``, see ``formats/tensors.py``), so a
    7B-sized adapter is never fully materialised when one module is needed.  ``units(name)`` validates and
    returns the module's units with the scale folded in (torch); ``arrays(name)`` the same as numpy
    :class:`~mergekit_lora.factor_arrays.ArrayUnits`, for readers that give an ``array_loader`` (safetensors
    files: ``has_arrays``).
    """

    def __init__(
        self,
        modules: Mapping[str, ModuleInfo],
        meta: AdapterMeta,
        loader: Callable[[ModuleInfo], RankUnits],
        *,
        path: Path | None = None,
        unknown_keys: list[str] | None = None,
        label: str | None = None,
        array_loader: Callable[[ModuleInfo], ArrayUnits] | None = None,
        into_loader: Callable[[ModuleInfo, torch.Tensor, torch.Tensor, bool], bool] | None = None,
    ) -> None:
        self.modules: dict[str, ModuleInfo] = dict(modules)
        self.meta = meta
        self._loader = loader
        self.path = path
        self.unknown_keys = list(unknown_keys or [])
        self.label = label or (path.name if path is not None else "adapter")
        self._array_loader = array_loader
        self._into_loader = into_loader

    @classmethod
    def from_units(cls, units: Mapping[str, RankUnits], meta: AdapterMeta, label: str = "memory") -> Adapter:
        """An in-memory adapter (tests, merge results)."""
        infos = {
            n: ModuleInfo(n, u.rank, u.d_out, u.d_in, u.weight_shape, u.kind, u.fan_in_fan_out,
                          float(u.rank), 1.0, dtype_name(u.A.dtype))
            for n, u in units.items()
        }
        stored = dict(units)
        return cls(infos, meta, lambda info: stored[info.name], label=label)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    def module_names(self) -> list[str]:
        return list(self.modules)

    def units(self, name: str, source: int = 0) -> RankUnits:
        """Load one module's units (scale folded into B), tagging every unit with ``source``."""
        u = self._loader(self.modules[name])
        check_magnitude(u, name, self.path or self.label)
        return u.tagged(source) if source else u

    def factors_into(self, name: str, A_out: torch.Tensor, B_out: torch.Tensor, check: bool = False) -> bool:
        """Module ``name``'s factors read straight into ``A_out`` [r, d_in] and ``B_out`` [d_out, r] (contiguous,
        the compute dtype), the scale folded into B as :meth:`units` folds it: whether they were read (False,
        nothing usable written, when the reader cannot: not a safetensors file, or it stores another dtype than
        ``A_out``'s; then use :meth:`units`).  The caller builds the units around its own views (LoRA-LEGO's
        pool) and checks them with :meth:`check_read` from their max-abs (a whole module's inputs at once);
        ``check=True`` refuses stored NaN/Inf while reading, as :meth:`units` does."""
        return self._into_loader is not None and self._into_loader(self.modules[name], A_out, B_out, check)

    def check_read(self, name: str, a_max: float, b_max: float) -> None:
        """The checks :meth:`units` makes, for module ``name`` read by :meth:`factors_into`, from
        max |A| and max |B| (scale folded in; NaN if any entry is NaN): the same refusals with the same
        messages (a non-finite value is traced by reading the module again with :meth:`units`, which names
        the tensor when the file itself holds NaN/Inf)."""
        where = self.path or self.label
        if not (math.isfinite(a_max) and math.isfinite(b_max)):
            self.units(name)  # raises the message of the default reading (the stored tensor, or the scale)
        check_bounds(a_max, b_max, self.modules[name].rank, name, where)

    @property
    def has_arrays(self) -> bool:
        """Whether :meth:`arrays` can load modules without torch."""
        return self._array_loader is not None

    def arrays(self, name: str, source: int = 0) -> ArrayUnits:
        """:meth:`units` as numpy :class:`ArrayUnits` (same values, same checks); needs :attr:`has_arrays`."""
        if self._array_loader is None:
            raise TypeError(f"{self.label}: this adapter's reader gives no numpy factors")
        u = self._array_loader(self.modules[name])
        check_magnitude(u, name, self.path or self.label)
        return u.tagged(source) if source else u

    def iter_units(self, source: int = 0) -> Iterator[tuple[str, RankUnits]]:
        for name in self.modules:
            yield name, self.units(name, source)

    def num_params(self) -> int:
        return sum(i.rank * (i.d_in + i.d_out) for i in self.modules.values())

    def __repr__(self) -> str:
        return f"Adapter({self.label!r}, format={self.meta.format}, modules={len(self.modules)})"


def output_meta(adapters: Sequence[Adapter]) -> AdapterMeta:
    """Metadata carried to a merge's output: the first input's, with fields that vary across inputs cleared."""
    first = adapters[0].meta
    bases = {a.meta.base_model for a in adapters if a.meta.base_model}
    tasks = {a.meta.task_type for a in adapters if a.meta.task_type}
    fifo = {a.meta.fan_in_fan_out for a in adapters}
    return AdapterMeta(
        format=first.format,
        base_model=next(iter(bases)) if len(bases) == 1 else None,
        revision=first.revision if len(adapters) == 1 else None,
        task_type=next(iter(tasks)) if len(tasks) == 1 else None,
        target_modules=None,
        fan_in_fan_out=fifo == {True},
        dtype=first.dtype,
        config={},
        extra=dict(first.extra),
    )


# Issue 28: the largest |ΔW| entry an input may reach, max|B|·max|A|·r (scale folded into B), and the
# largest factor entry.  Every method squares such values somewhere (Gram matrices, norms, ‖ΔW‖² in the
# card) and float32 ends at 3.4e38: 1e15 leaves room for a square times a dimension of 10⁸.  Real
# adapters stay below 1e3; an input beyond this is refused by name before any method sees it.
MAX_MAGNITUDE = 1e15


def _max_abs(t: Any) -> float:
    """max |t| of a torch tensor from one min/max pass (no |t| temporary: a fresh full-size allocation per
    factor), of a numpy array as ``abs(t).max()``; NaN stays NaN."""
    if not hasattr(t, "aminmax"):  # numpy factors (a torch-free merge)
        return float(abs(t).max())
    lo, hi = t.detach().aminmax()
    return max(-float(lo), float(hi)) if not (lo.isnan() or hi.isnan()) else math.nan


def check_magnitude(u: RankUnits, name: str, where: object) -> None:
    """Refuse a module whose factors would overflow float32 products (see :data:`MAX_MAGNITUDE`);
    ``u``'s factors are torch tensors or numpy arrays."""
    A, B = getattr(u, "A", None), getattr(u, "B", None)
    if A is None or B is None or not hasattr(A, "shape") or not math.prod(A.shape) or not math.prod(B.shape):
        return
    check_bounds(_max_abs(A), _max_abs(B), u.rank, name, where)


def within_bounds(a: float, b: float, rank: int) -> bool:
    """Whether max |A| = ``a`` and max |B| = ``b`` at ``rank`` pass :func:`check_bounds` (monotone in each:
    bounds that pass for the largest of several modules' values pass for each)."""
    return math.isfinite(a) and math.isfinite(b) and a <= MAX_MAGNITUDE and b <= MAX_MAGNITUDE and \
        a * b * max(1, rank) <= MAX_MAGNITUDE


def check_bounds(a: float, b: float, rank: int, name: str, where: object) -> None:
    """:func:`check_magnitude` from max |A| = ``a`` and max |B| = ``b`` (scale folded in)."""
    bound = a * b * max(1, rank)
    if not (math.isfinite(a) and math.isfinite(b)):  # read finite: the scale alpha/r overflowed float32
        raise LoraMergeError(
            f"{where}: module {name}: factor entries are not finite once the scale alpha/r is folded into lora_B "
            f"(up to {a:.3g} in lora_A, {b:.3g} in lora_B); the adapter is corrupt or mis-scaled: re-export it")
    if a <= MAX_MAGNITUDE and b <= MAX_MAGNITUDE and bound <= MAX_MAGNITUDE:
        return
    raise LoraMergeError(
        f"{where}: module {name}: factor entries up to {a:.3g} (lora_A) and {b:.3g} (lora_B, scale folded in) at "
        f"rank {rank}, so ΔW = B·A could reach {bound:.3g}; beyond {MAX_MAGNITUDE:.0e} the merge would overflow "
        "float32 products. The adapter is corrupt or mis-scaled: re-export it (or rescale its factors)")

