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

from ..errors import LoraMergeError
from ..formats.routed import RoutedAdapter, RoutedUnits
from .hierarchical import HierContext, allowed_units, token_mask
from .routers import apply_units, dense_weights, select


def _features(module: nn.Module) -> tuple[int, int, bool] | None:
    """(d_in, d_out, fan_in_fan_out) for nn.Linear and transformers' Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        w = module.weight
        return int(w.shape[0]), int(w.shape[1]), True
    return None


SHARED_INPUTS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}), frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}), frozenset({"w1", "w3"}),
)
"""Sibling modules that read the same input tensor in common architectures: one fused projection."""

SPARSE_RATIO = 16
"""Apply the update by gathering the k selected columns of B when R >= SPARSE_RATIO·k (else a dense masked
matmul, faster for small R: measured in ``evals/bench/RESULTS-routing.md``)."""


class SharedProjection:
    """One matmul h·[A₁; G₁; A₂; …]ᵀ for sibling routed layers that receive the very same input tensor.

    The first member called with a new input computes every member's projection; the others take their
    slice if their input is the same object (same version), else compute their own.
    """

    def __init__(self, members: list[RoutedLoraLayer]) -> None:
        self.members = members
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._P: torch.Tensor | None = None
        self._xv = -1
        self._pending: set[int] = set()
        self._offsets: dict[int, tuple[int, int]] = {}

    def usable(self) -> bool:
        return not (torch.is_grad_enabled() and any(m.gate is not None and m.gate.requires_grad for m in self.members))

    def weight(self) -> torch.Tensor:
        parts = [m.proj_weight() for m in self.members]
        key = tuple((p.data_ptr(), _version(p)) for p in parts)
        if key != self._key or self._weight is None:
            self._weight = torch.cat(parts)
            self._key = key
            off = 0
            for m, p in zip(self.members, parts):
                self._offsets[id(m)] = (off, off + p.shape[0])
                off += p.shape[0]
        return self._weight

    def project(self, layer: RoutedLoraLayer, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self._x is not x or self._P is None or self._xv != _version(x) or id(layer) not in self._pending:
            self._P = h @ self.weight().T
            self._x, self._xv = x, _version(x)
            self._pending = {id(m) for m in self.members}
        lo, hi = self._offsets[id(layer)]
        P = self._P[:, lo:hi]
        self._pending.discard(id(layer))
        if not self._pending:  # every member has its slice: drop the references
            self._x = self._P = None
        return P


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference tensors (``torch.inference_mode``) have none: -1."""
    return -1 if t.is_inference() else t._version


class RoutedLoraLayer(nn.Module):
    """base(x) + Σ_{active i} w_i(x) · b_i (a_i·x), with the active set chosen per token by the router."""

    def __init__(self, base: nn.Module, ru: RoutedUnits, *, top_k: int | None = None,
                 ctx: HierContext | None = None) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        u = ru.units.to(device=w.device, dtype=w.dtype)
        self.router = ru.router
        self.top_k = int(top_k if top_k is not None else ru.top_k)
        self.temperature = float(ru.temperature)
        self.register_buffer("unit_A", u.A.detach().clone(), persistent=False)
        self.register_buffer("unit_B", u.B.detach().clone(), persistent=False)
        self.register_buffer("unit_Bt", u.B.detach().T.contiguous(), persistent=False)
        self.register_buffer("b_norm", u.B.detach().norm(dim=0), persistent=False)
        self.register_buffer("source", u.source.clone().to(w.device), persistent=False)
        # the selection bias d is fitted by a rule, not by gradient: a buffer
        self.register_buffer("bias", ru.bias_or_zeros().to(w.device, w.dtype).clone(), persistent=False)
        self.gate = nn.Parameter(ru.gate.to(w.device, w.dtype).clone()) if ru.gate is not None else None
        self.spec = ru
        # hierarchical router: per-source input Gaussians (float32), shared per-forward context
        self.ctx = ctx
        self.profile_mean = None if ru.profile_mean is None else ru.profile_mean.to(w.device, torch.float32).clone()
        self.profile_var = None if ru.profile_var is None else ru.profile_var.to(w.device, torch.float32).clone()
        self.prof_stats: dict[int, list] = {}
        self.group: SharedProjection | None = None
        self.sparse: bool | None = None  # None: by SPARSE_RATIO
        self._proj_key: tuple | None = None
        self._proj: torch.Tensor | None = None
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

    def proj_weight(self) -> torch.Tensor:
        """[A; G] (gate router) or A: the one input projection of this layer."""
        if self.gate is None:
            return self.unit_A
        if torch.is_grad_enabled() and self.gate.requires_grad:
            return torch.cat([self.unit_A, self.gate])  # differentiable: calibration trains G
        key = (self.gate.data_ptr(), _version(self.gate))
        if key != self._proj_key or self._proj is None:
            self._proj = torch.cat([self.unit_A, self.gate.detach()])
            self._proj_key = key
        return self._proj

    def _allowed(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Hierarchical router: (allowed units [N, R] bool, forced unit weights [R]) for this batch."""
        ctx = self.ctx
        if ctx is not None and ctx.force is not None:
            if ctx.profiling:
                self._accumulate(x, h, ctx)
            return None, (self.source == ctx.force).to(h.dtype)
        if self.profile_mean is None or self.profile_var is None:
            return None, None
        allowed = allowed_units(tuple(x.shape), h, self.source, self.profile_mean, self.profile_var, ctx=ctx,
                                evidence=self.spec.evidence, top_m=self.spec.top_m, mass=self.spec.mass,
                                temperature=self.temperature, is_first=ctx is None or ctx.first is self)
        return allowed, None

    def _accumulate(self, x: torch.Tensor, h: torch.Tensor, ctx: HierContext) -> None:
        """Profiling: Σ m, Σ m·x, Σ m·x² over real tokens for source ``ctx.force`` (float64)."""
        m = token_mask(tuple(x.shape), ctx, h.device).reshape(-1, 1).double()
        hd = h.detach().double()
        st = self.prof_stats.setdefault(int(ctx.force), [0.0, 0.0, 0.0])  # type: ignore[arg-type]
        st[0] = st[0] + m.sum()
        st[1] = st[1] + (m * hd).sum(0)
        st[2] = st[2] + (m * hd * hd).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = x.reshape(-1, x.shape[-1]).to(self.unit_A.dtype)
        R = self.rank
        grp = self.group
        P = grp.project(self, x, h) if grp is not None and grp.usable() else h @ self.proj_weight().T
        y = P[:, :R]
        gate_raw = P[:, R:] if self.gate is not None else None
        allowed = forced = None
        if self.router == "hierarchical":
            allowed, forced = self._allowed(x, h)
        if forced is not None:
            idx, w, logits = None, forced, None
        else:
            idx, w, logits = select(self.router, h, y, b_norm=self.b_norm, bias=self.bias, top_k=self.top_k,
                                    temperature=self.temperature, gate_raw=gate_raw, allowed=allowed)
        sparse = self.sparse if self.sparse is not None else (idx is not None and R >= SPARSE_RATIO * idx.shape[-1])
        delta = apply_units(y, self.unit_B, (idx, w), Bt=self.unit_Bt, sparse=sparse)
        if self.capture or self.record:
            wd = dense_weights((idx, w), y)
            if self.capture:  # calibration reads these for the load-balancing term
                self.last_logits, self.last_weights = logits, wd
            if self.record:
                with torch.no_grad():
                    wd = wd.detach()
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
        """The layer's current router state as :class:`RoutedUnits` (fitted gate/bias/profiles, activation)."""
        act = (self.act_sum / self.tokens).float().cpu() if self.tokens else self.spec.activation
        cpu = lambda t: None if t is None else t.detach().float().cpu().clone()  # noqa: E731
        return replace(self.spec, top_k=self.top_k, bias=cpu(self.bias), gate=cpu(self.gate), activation=act,
                       profile_mean=cpu(self.profile_mean), profile_var=cpu(self.profile_var))

    def extra_repr(self) -> str:
        return f"router={self.router}, R={self.rank}, top_k={self.top_k}"


@dataclass
class Attached:
    """What :func:`attach` did: the routed layers by module name."""

    layers: dict[str, RoutedLoraLayer] = field(default_factory=dict)
    context: HierContext | None = None  # hierarchical router: the shared per-forward state

    def routed(self, like: RoutedAdapter) -> RoutedAdapter:
        """A routed adapter holding the layers' current router state (after calibration)."""
        return RoutedAdapter({n: layer.routed_units() for n, layer in self.layers.items()}, like.base_model,
                             list(like.sources), dict(like.info))


def _root(model: nn.Module) -> nn.Module:
    """Module paths are the base model's: look through a PeftModel wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attach(model: nn.Module, routed: RoutedAdapter | Mapping[str, RoutedUnits], *,
           top_k: int | Mapping[str, int] | None = None, fuse: bool = True) -> Attached:
    """Replace every targeted module with a :class:`RoutedLoraLayer`; all checks run before any change.

    ``top_k`` overrides the adapter's per-module top-k: one int for all modules, or module name -> k.
    ``fuse`` computes the projections of sibling modules that read the same input (q/k/v, gate/up)
    with one matmul.  A hierarchical router installs hooks on ``model`` that read ``attention_mask``.
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
    if any(ru.router == "hierarchical" for _, _, ru, _ in plan):
        handle.context = HierContext()
    order = {n: i for i, (n, _) in enumerate(root.named_modules())}
    plan.sort(key=lambda p: order.get(p[0], len(order)))  # forward order: the depth evidence accumulates
    for name, target, ru, k in plan:
        layer = RoutedLoraLayer(target, ru, top_k=k,
                                ctx=handle.context if ru.router == "hierarchical" else None)
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer)
        handle.layers[name] = layer
    if handle.context is not None:
        handle.context.first = next(la for la in handle.layers.values() if la.ctx is not None)
        handle.context.install(model)
    if fuse:
        _group_siblings(handle.layers)
    return handle


def _group_siblings(layers: Mapping[str, RoutedLoraLayer]) -> None:
    groups: dict[tuple[str, frozenset[str]], list[RoutedLoraLayer]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        for names in SHARED_INPUTS:
            if child in names:
                groups.setdefault((parent, names), []).append(layer)
    for members in groups.values():
        dims = {(m.unit_A.shape[1], m.unit_A.dtype, m.unit_A.device) for m in members}
        if len(members) > 1 and len(dims) == 1:
            shared = SharedProjection(members)
            for m in members:
                m.group = shared


def routed_layers(model: nn.Module) -> dict[str, RoutedLoraLayer]:
    return {n: m for n, m in _root(model).named_modules() if isinstance(m, RoutedLoraLayer)}


def detach(model: nn.Module) -> int:
    """Put the original modules back (the same objects: bit-identical outputs).  Returns how many."""
    root = _root(model)
    layers = routed_layers(model)
    for layer in layers.values():
        if layer.ctx is not None:
            layer.ctx.remove()
        layer.group = None
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, layer.base)
    return len(layers)
