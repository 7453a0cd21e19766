"""Attach a routed adapter to a torch model: routed LoRA layers around nn.Linear / GPT-2 Conv1D.

``attach(model, routed)`` replaces each targeted module (found by its path, the adapter's module
name) with a :class:`RoutedLoraLayer` that keeps the original module as ``.base`` and adds the
routed update per token; ``detach(model)`` puts the very same original module objects back, so the
model is restored bit for bit.  Units are frozen buffers; the gate matrix (gate router) is the only
``nn.Parameter``, so calibration trains exactly the router.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import LoraMergeError
from .routing.format import RoutedAdapter, RoutedUnits
from .routing.routers import route_weights


def _features(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, fan_in_fan_out) for nn.Linear and transformers' Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        w = module.weight
        return int(w.shape[0]), int(w.shape[1]), True
    return None


class RoutedLoraLayer(nn.Module):
    """base(x) + Σ_{active i} w_i(x) · b_i (a_i·x), with the active set chosen per token by the router."""

    def __init__(self, base: nn.Module, ru: RoutedUnits, *, top_k: int | None = None) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        u = ru.units.to(device=w.device, dtype=w.dtype)
        self.router = ru.router
        self.top_k = int(top_k if top_k is not None else ru.top_k)
        self.temperature = float(ru.temperature)
        self.register_buffer("unit_A", u.A.detach().clone(), persistent=False)
        self.register_buffer("unit_B", u.B.detach().clone(), persistent=False)
        self.register_buffer("b_norm", u.B.detach().norm(dim=0), persistent=False)
        self.register_buffer("source", u.source.clone(), persistent=False)
        # the selection bias d is fitted by a rule, not by gradient: a buffer
        self.register_buffer("bias", ru.bias_or_zeros().to(w.device, w.dtype).clone(), persistent=False)
        self.gate = nn.Parameter(ru.gate.to(w.device, w.dtype).clone()) if ru.gate is not None else None
        self.spec = ru
        self.record = False
        self.capture = False
        self.token_mask: torch.Tensor | None = None  # [N] bool: real (non-padding) tokens, set by calibration
        self.register_buffer("act_sum", torch.zeros(u.rank, dtype=torch.float64, device=w.device), persistent=False)
        self.register_buffer("load_sum", torch.zeros(u.rank, dtype=torch.float64, device=w.device), persistent=False)
        self.tokens = 0
        self.last_logits: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.unit_A.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = x.reshape(-1, x.shape[-1]).to(self.unit_A.dtype)
        y = h @ self.unit_A.T
        w, logits = route_weights(self.router, h, y, b_norm=self.b_norm, bias=self.bias, top_k=self.top_k,
                                  temperature=self.temperature, gate=self.gate)
        if self.router == "implicit" and self.top_k >= self.rank:
            delta = y @ self.unit_B.T  # every unit active with weight 1: exactly the cat merge
        else:
            delta = (y * w) @ self.unit_B.T
        if self.capture:  # calibration reads these for the load-balancing term
            self.last_logits, self.last_weights = logits, w
        if self.record:
            with torch.no_grad():
                wd = w.detach()
                mask = self.token_mask
                if mask is not None and mask.numel() == wd.shape[0]:
                    wd = wd[mask.to(wd.device)]
                self.act_sum += wd.sum(0).double()
                self.load_sum += (wd != 0).sum(0).double()
                self.tokens += wd.shape[0]
        return out + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(out.dtype)

    def reset_stats(self) -> None:
        self.act_sum.zero_()
        self.load_sum.zero_()
        self.tokens = 0

    def routed_units(self) -> RoutedUnits:
        """The layer's current router state as :class:`RoutedUnits` (fitted gate/bias, measured activation)."""
        act = (self.act_sum / self.tokens).float().cpu() if self.tokens else self.spec.activation
        return replace(self.spec, top_k=self.top_k, bias=self.bias.detach().float().cpu().clone(),
                       gate=None if self.gate is None else self.gate.detach().float().cpu().clone(),
                       activation=act)

    def extra_repr(self) -> str:
        return f"router={self.router}, R={self.rank}, top_k={self.top_k}"


@dataclass
class Attached:
    """What :func:`attach` did: the routed layers by module name."""

    layers: dict[str, RoutedLoraLayer] = field(default_factory=dict)

    def routed(self, like: RoutedAdapter) -> RoutedAdapter:
        """A routed adapter holding the layers' current router state (after calibration)."""
        return RoutedAdapter({n: layer.routed_units() for n, layer in self.layers.items()}, like.base_model,
                             list(like.sources), dict(like.info))


def _root(model: nn.Module) -> nn.Module:
    """Module paths are the base model's: look through a PeftModel wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attach(model: nn.Module, routed: RoutedAdapter | Mapping[str, RoutedUnits], *,
           top_k: int | Mapping[str, int] | None = None) -> Attached:
    """Replace every targeted module with a :class:`RoutedLoraLayer`; all checks run before any change.

    ``top_k`` overrides the adapter's per-module top-k: one int for all modules, or module name -> k.
    """
    mods = routed.modules if isinstance(routed, RoutedAdapter) else dict(routed)
    root = _root(model)
    plan: list[tuple[str, nn.Module, RoutedUnits, int]] = []
    for name, ru in mods.items():
        try:
            target = root.get_submodule(name)
        except AttributeError:
            raise LoraMergeError(f"the model has no module {name!r}; attach the routed adapter to the base model "
                                 "it was made for") from None
        if isinstance(target, RoutedLoraLayer):
            raise LoraMergeError(f"module {name!r} already has a routed adapter attached; detach it first")
        feats = _features(target)
        if feats is None:
            kind = "a PEFT LoRA layer" if hasattr(target, "base_layer") else type(target).__name__
            raise LoraMergeError(f"module {name!r} is {kind}; routing attaches to nn.Linear or Conv1D modules of a "
                                 "plain base model (merge_and_unload a PEFT model first)")
        if (feats[0], feats[1]) != (ru.d_in, ru.d_out):
            raise LoraMergeError(f"module {name!r} maps {feats[0]} -> {feats[1]} features but the routed units map "
                                 f"{ru.d_in} -> {ru.d_out}; wrong base model")
        k = top_k.get(name, ru.top_k) if isinstance(top_k, Mapping) else (top_k or ru.top_k)
        if not 1 <= int(k) <= ru.rank:
            raise LoraMergeError(f"top-k {k} for module {name!r} is outside 1..{ru.rank} (its number of units)")
        plan.append((name, target, ru, int(k)))
    if isinstance(top_k, Mapping):
        unknown = sorted(set(top_k) - set(mods))
        if unknown:
            raise LoraMergeError(f"top-k override for unknown module(s): {', '.join(unknown[:3])}")
    handle = Attached()
    for name, target, ru, k in plan:
        layer = RoutedLoraLayer(target, ru, top_k=k)
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer)
        handle.layers[name] = layer
    return handle


def routed_layers(model: nn.Module) -> dict[str, RoutedLoraLayer]:
    return {n: m for n, m in _root(model).named_modules() if isinstance(m, RoutedLoraLayer)}


def detach(model: nn.Module) -> int:
    """Put the original modules back (the same objects: bit-identical outputs).  Returns how many."""
    root = _root(model)
    layers = routed_layers(model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer.base)
    return len(layers)
