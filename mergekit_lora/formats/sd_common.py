"""Shared by the kohya and diffusers converters: (down, up, alpha) key triples -> lazy rank units, and back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, AdapterMeta, ModuleInfo
from ..arrays import Stored, dtype_name, torch_dtype
from ..errors import LoraMergeError
from ..factor_arrays import ArrayUnits
from ..names import natural_key
from .sd_detect import base_family
from .tensors import TensorSource, compute_dtype

if TYPE_CHECKING:

    from ..units import RankUnits


@dataclass
class Entry:
    """One module's keys in a file: the down (A) and up (B) factor and the optional alpha scalar."""

    down: str | None = None
    up: str | None = None
    alpha: str | None = None


@dataclass
class Parsed:
    """What a converter understood: module name -> keys, and every key it did not consume."""

    entries: dict[str, Entry]
    unconsumed: list[str]


def _shape_info(f: Any, name: str, e: Entry, src: TensorSource) -> tuple[int, int, int, tuple[int, ...], str]:
    ds, us = src.check_factor(e.down), src.check_factor(e.up)
    if len(ds) not in (2, 4) or len(us) != len(ds):
        raise LoraMergeError(f"{f}: {e.down} {ds} and {e.up} {us} are not a linear (2-D) or conv (4-D) LoRA pair")
    r = ds[0]
    if us[1] != r or any(s != 1 for s in us[2:]):
        raise LoraMergeError(f"{f}: {e.down} has rank {r} but {e.up} has shape {us}; the up weight must be [out, {r}(, 1, 1)]")
    d_out = us[0]
    if len(ds) == 2:
        return r, d_out, ds[1], (d_out, ds[1]), "linear"
    return r, d_out, int(math.prod(ds[1:])), (d_out, *ds[1:]), "conv"


_ALPHA_NAMES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8"}
_ALPHA_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8"}


def _alpha(src: TensorSource, key: str) -> float:
    """A module's alpha scalar: one finite number (any numeric dtype), else refused by key."""
    name = src.dtype_names.get(key)
    if (name is not None and name not in _ALPHA_NAMES) or src.dtypes[key] not in _ALPHA_DTYPES:
        raise LoraMergeError(f"{src.path}: tensor {key} has dtype {src.dtype_name(key)}; alpha must be a number "
                             "(F32, F16, BF16, F64 or an integer)")
    shape = src.shapes[key]
    if math.prod(shape) != 1:
        raise LoraMergeError(f"{src.path}: tensor {key} has shape {list(shape)}; alpha must be one number")
    alpha = src.scalar(key)
    if not math.isfinite(alpha):
        raise LoraMergeError(f"{src.path}: tensor {key} is not a finite number; the adapter is corrupt")
    return alpha


def adapter_from_entries(src: TensorSource, parsed: Parsed, *, fmt: str, naming: str, label: str) -> Adapter:
    """Build a lazy :class:`Adapter`: only the alpha scalars are read now, the factors per module on demand."""
    f = src.path
    infos: dict[str, ModuleInfo] = {}
    dtype = None
    assumed = 0
    for name in sorted(parsed.entries, key=natural_key):
        e = parsed.entries[name]
        if e.down is None or e.up is None:
            have = e.down or e.up or e.alpha
            raise LoraMergeError(f"{f}: module {name} has {have} but no {'up' if e.up is None else 'down'} weight; "
                                 "the file is incomplete")
        r, d_out, d_in, ws, kind = _shape_info(f, name, e, src)
        if e.alpha is not None:
            alpha = _alpha(src, e.alpha)
        else:
            alpha, assumed = float(r), assumed + 1  # kohya: missing alpha means alpha = rank
        infos[name] = ModuleInfo(name, r, d_out, d_in, ws, kind, False, alpha, alpha / r if r else 1.0,
                                 src.dtypes[e.down])
        dtype = dtype or src.dtypes[e.down]
    if not infos:
        raise LoraMergeError(f"{f}: no LoRA weights found (expected lora_down/lora_up or lora_A/lora_B pairs)")
    shapes = {n: (i.d_out, i.d_in) for n, i in infos.items()}
    meta = AdapterMeta(
        format=fmt, dtype=dtype or "float32",
        extra={"naming": naming, "base_family": base_family(list(infos), shapes, src.metadata),
               "metadata": dict(src.metadata), "alpha_assumed": assumed == len(infos),
               "unconsumed": list(parsed.unconsumed)},
    )

    def load(info: ModuleInfo) -> RankUnits:
        from ..units import RankUnits  # lazily: torch, only when a method computes with it

        e = parsed.entries[info.name]
        ct = compute_dtype(info.dtype)
        return RankUnits.from_factors(src.get(e.down).to(ct), src.get(e.up).to(ct), scale=info.scale,
                                      weight_shape=info.weight_shape, kind=info.kind)

    def load_arrays(info: ModuleInfo) -> ArrayUnits:
        e = parsed.entries[info.name]
        return ArrayUnits.from_factors(src.array(e.down), src.array(e.up), scale=info.scale,
                                       weight_shape=info.weight_shape, kind=info.kind)

    return Adapter(infos, meta, load, path=f, unknown_keys=list(parsed.unconsumed), label=label,
                   array_loader=load_arrays if src.has_arrays else None)


def factors(u: RankUnits | ArrayUnits, dtype: Any) -> tuple[Any, Any]:
    """(down, up) in ``dtype`` with conv kernels restored: down [r, in, kh, kw], up [out, r, 1, 1]; rank 0 -> one
    zero unit.  Torch tensors for :class:`RankUnits`, :class:`~mergekit_lora.arrays.Stored` numpy arrays for
    :class:`ArrayUnits` (the same bytes)."""
    if u.kind not in ("linear", "conv") or u.fan_in_fan_out:
        raise LoraMergeError(f"a {u.kind} LoRA (weight shape {u.weight_shape}) cannot be written in an SD format")
    conv = (u.rank, *u.weight_shape[1:]), (u.d_out, max(u.rank, 1), *([1] * (len(u.weight_shape) - 2)))
    if isinstance(u, ArrayUnits):
        A, B = u.stored(dtype_name(dtype))
        if u.kind == "conv":
            A, B = (Stored(A.data.reshape(max(u.rank, 1), *conv[0][1:]), A.dtype),
                    Stored(B.data.reshape(conv[1]), B.dtype))
        return A, B
    import torch  # a RankUnits' tensors: torch is already imported

    if u.rank == 0:
        u = u.with_factors(torch.zeros(1, u.d_in, dtype=u.A.dtype), torch.zeros(u.d_out, 1, dtype=u.B.dtype))
    dt = torch_dtype(dtype)
    A = u.A.detach().to("cpu", dt)
    B = u.B.detach().to("cpu", dt)
    if u.kind == "conv":
        A = A.reshape(u.rank, *u.weight_shape[1:])
        B = B.reshape(u.d_out, u.rank, *([1] * (len(u.weight_shape) - 2)))
    return A.contiguous(), B.contiguous()
