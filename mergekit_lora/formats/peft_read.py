"""Read PEFT LoRA adapters: a folder, a bare adapter_model.safetensors, or any file with PEFT keys.

The header and config are interpreted by :mod:`.peft_layout` (no torch); this module turns a layout
into an :class:`Adapter` whose loaders read one module's factors on demand, as torch tensors or (a
safetensors file) as numpy arrays; reading the header imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, AdapterMeta, ModuleInfo
from ..factor_arrays import ArrayUnits
from .peft_layout import has_peft_keys, label_of, locate, peft_layout, read_config
from .tensors import TensorSource, compute_dtype

if TYPE_CHECKING:
    import torch

    from ..units import RankUnits

__all__ = ["adapter_from_peft_source", "has_peft_keys", "read_peft"]


def read_peft(path: Path, *, allow_pickle: bool = False, ignore_modules_to_save: bool = False,
              strict: bool = True) -> Adapter:
    """Read a PEFT LoRA adapter into rank units (lazily).

    ``strict``: keys we cannot interpret are an error (merges); ``strict=False`` lists them in
    ``adapter.unknown_keys`` instead (inspect).
    """
    path = Path(path)
    weights, config_path = locate(path, allow_pickle)
    config = read_config(config_path) if config_path else {}
    src = TensorSource.open(weights, allow_pickle=allow_pickle)
    return adapter_from_peft_source(src, config, config_path=config_path,
                                    ignore_modules_to_save=ignore_modules_to_save, strict=strict)


def adapter_from_peft_source(src: TensorSource, config: dict[str, Any], *, config_path: Path | None = None,
                             ignore_modules_to_save: bool = False, strict: bool = True,
                             fmt: str = "peft") -> Adapter:
    """Build an :class:`Adapter` from PEFT-style keys in ``src`` and a (possibly empty) config."""
    layout = peft_layout(src, config, ignore_modules_to_save=ignore_modules_to_save, strict=strict)
    infos = {m.name: ModuleInfo(m.name, m.rank, m.d_out, m.d_in, m.weight_shape, m.kind, m.fan_in_fan_out,
                                m.alpha, m.scale, src.dtypes[m.a_key])
             for m in layout.modules.values()}
    meta = AdapterMeta(
        format=fmt,
        base_model=config.get("base_model_name_or_path"),
        revision=config.get("revision"),
        task_type=config.get("task_type"),
        target_modules=config.get("target_modules"),
        fan_in_fan_out=layout.fan_in_fan_out,
        dtype=next(iter(infos.values())).dtype,  # the first module's (a layout has at least one)
        config=dict(config),
        extra={"key_prefix": layout.key_prefix, "alpha_assumed": layout.alpha_assumed,
               "dropped_modules_to_save": layout.saved_modules,
               "dropped_base_layers": layout.base_layers, "metadata": src.metadata,
               "config_path": str(config_path) if config_path else None},
    )

    def load(info: ModuleInfo) -> RankUnits:
        from ..units import RankUnits  # lazily: torch, only when a method computes with it

        m = layout.modules[info.name]
        ct = compute_dtype(info.dtype)
        A = src.get(m.a_key).to(ct)
        B = src.get(m.b_key).to(ct)
        return RankUnits.from_factors(A, B, scale=info.scale, weight_shape=info.weight_shape, kind=info.kind,
                                      fan_in_fan_out=info.fan_in_fan_out)

    def load_into(info: ModuleInfo, A_out: torch.Tensor, B_out: torch.Tensor, check: bool) -> bool:
        """:func:`load`'s factors straight into A_out [r, d_in] and B_out [d_out, r] (contiguous), the scale
        folded in there; False when the file does not store the factors in their dtype (the caller then loads).
        ``check``: refuse stored NaN/Inf (else the caller checks: ``Adapter.check_read``)."""
        m = layout.modules[info.name]
        if (B_out.dtype != A_out.dtype or not src.get_into(m.a_key, A_out, check)
                or not src.get_into(m.b_key, B_out, check)):
            return False
        if info.scale != 1.0:
            B_out.mul_(info.scale)  # as from_factors' B * scale: one rounding per entry, the same bits
        return True

    def load_arrays(info: ModuleInfo) -> ArrayUnits:
        m = layout.modules[info.name]
        return ArrayUnits.from_factors(src.array(m.a_key), src.array(m.b_key), scale=info.scale,
                                       weight_shape=info.weight_shape, kind=info.kind,
                                       fan_in_fan_out=info.fan_in_fan_out)

    return Adapter(infos, meta, load, path=src.path, unknown_keys=layout.unknown_keys, label=label_of(src.path),
                   array_loader=load_arrays if src.has_arrays else None,
                   into_loader=load_into if src.has_arrays else None)
