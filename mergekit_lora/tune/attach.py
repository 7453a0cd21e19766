"""Attach merged units to a model in memory (forward hooks), no adapter folder and no PEFT injection.

For every merged module ``y = base(x) + (x Aᵀ) Bᵀ`` (B carries the LoRA scale, so this is PEFT's
update); hooks are removed on exit, leaving the base model untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.units import RankUnits


@contextmanager
def attached_units(model: nn.Module, units: Mapping[str, RankUnits]) -> Iterator[nn.Module]:
    handles = []
    try:
        for name, u in units.items():
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise LoraMergeError(f"the base model has no module {name!r}; tune against the model the adapters "
                                     "were trained on") from None
            if u.kind != "linear" or not isinstance(mod, nn.Linear):
                raise LoraMergeError(f"module {name!r}: tune attaches linear LoRA modules only (got {u.kind} on "
                                     f"{type(mod).__name__})")
            w = mod.weight
            A = u.A.to(device=w.device, dtype=w.dtype)
            B = u.B.to(device=w.device, dtype=w.dtype)

            def hook(_m: nn.Module, args: tuple, out: torch.Tensor, A: torch.Tensor = A, B: torch.Tensor = B):
                return out + (args[0] @ A.T) @ B.T

            handles.append(mod.register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()
