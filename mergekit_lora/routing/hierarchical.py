"""Hierarchical routing (training-free, after HiLoRA, arXiv 2510.12266): sequence → adapter → rank unit.

Profiles.  For every routed module and every source adapter s, a diagonal Gaussian
N(μ_s, diag σ²_s) of the module's input x ∈ R^d is fitted on a few unlabeled examples of s's domain
(:func:`mergekit_lora.routing.profile.fit_profiles`): μ_s = mean of x over the real tokens, σ²_s =
their variance plus a floor ``var_floor``·mean_d(σ²_s) (so a dimension that never moved does not
dominate).  By default the profile of s is taken with adapter s itself active in every routed module
(its units at weight 1), so a deeper module sees the inputs it will see when s is chosen.

Sequence evidence.  For a token x at position t the log-likelihood under s is

    ℓ_s(x) = −½ Σ_d [ (x_d − μ_sd)² / σ²_sd + log σ²_sd ]            (the −½ d log 2π is common to all s)

and the evidence for s after t tokens of a sequence is the causal mean over its real (attention
mask 1) tokens, E_s(t) = (1/|τ ≤ t|) Σ_{τ ≤ t} ℓ_s(x_τ).  With ``evidence="depth"`` the module adds
the evidence of every routed module that ran before it in the same forward pass (a product of the
per-module likelihoods: later layers decide on everything seen so far); with ``"module"`` it uses its
own.  The posterior over adapters, with a uniform prior and temperature T, is
p(s | x_≤t) = softmax_s(E_s(t) / T).

Selection.  The chosen set C(t) is the ``top_m`` adapters by E, or (``mass``) the fewest adapters,
most probable first, whose posterior mass reaches ``mass``.  Then the token-level step: among the
units whose source is in C(t) the implicit router's score |a_i·x|·‖b_i‖ / mean_j(…) + d_i picks the
top-k, each active with weight 1.  With top_m = 1 and k ≥ the chosen adapter's rank the update is
exactly that adapter's own LoRA update; without profiles every adapter is chosen (= implicit).

Causality and padding: E(t) uses tokens ≤ t only, so a token's update never depends on later tokens,
and padding (attention mask 0, captured from the model's ``attention_mask`` argument) is ignored.
Each forward call is one evidence window: with a KV cache, a decoding step of one token is judged by
that token alone (re-run the prompt, or route per request with ``profile.select_adapter``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class HierContext:
    """State shared by the hierarchical layers of one :func:`attach` during one forward pass."""

    mask: torch.Tensor | None = None  # [B, T] attention mask of the current root forward (1 = real token)
    evidence: torch.Tensor | None = None  # [B, T, S] depth-accumulated evidence so far in this pass
    force: int | None = None  # profiling: every layer applies exactly source `force` (-1: no update)
    profiling: bool = False  # layers accumulate input statistics for source `force`
    first: Any = None  # the layer that resets the evidence (the first hierarchical layer in module order)
    hooks: list[Any] = field(default_factory=list)

    def install(self, model: nn.Module) -> None:
        """Capture ``attention_mask`` of every forward of ``model`` (a pre-hook; removed by :meth:`remove`)."""

        def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            m = kwargs.get("attention_mask")
            if m is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
                m = args[1]
            self.mask = m if isinstance(m, torch.Tensor) and m.ndim == 2 else None
            self.evidence = None

        def post(_mod: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
            self.mask = None
            self.evidence = None

        self.hooks.append(model.register_forward_pre_hook(pre, with_kwargs=True))
        self.hooks.append(model.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def gaussian_loglik(h: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """ℓ_s(x) for every token and source: h [N, d], mean/var [S, d] -> [N, S] (without the 2π term)."""
    h = h.to(mean.dtype)
    out = torch.empty(h.shape[0], mean.shape[0], dtype=mean.dtype, device=h.device)
    inv = var.reciprocal()
    logdet = var.log().sum(-1)
    for s in range(mean.shape[0]):  # S is small; a [N, S, d] temporary would be S times larger
        out[:, s] = -0.5 * (((h - mean[s]) ** 2) @ inv[s] + logdet[s])
    return out


def token_mask(shape: tuple[int, ...], ctx: HierContext | None, device: torch.device) -> torch.Tensor:
    """[B, T] float mask of real tokens for an input of shape [B, T, d] (all ones when unknown)."""
    B, T = (shape[0], shape[1]) if len(shape) == 3 else (1, math.prod(shape[:-1]))
    m = ctx.mask if ctx is not None else None
    if m is not None and tuple(m.shape) == (B, T):
        return m.to(device=device, dtype=torch.float32)
    return torch.ones(B, T, device=device)


def causal_evidence(ll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """E(t) = mean of ℓ over real tokens τ ≤ t: ll [B, T, S], mask [B, T] -> [B, T, S]."""
    m = mask[..., None].to(ll.dtype)
    return (ll * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)


def choose_sources(evidence: torch.Tensor, *, top_m: int = 1, mass: float | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """Chosen adapters per token: evidence [N, S] -> bool [N, S] (top-m, or the smallest set reaching ``mass``)."""
    S = evidence.shape[-1]
    if mass is None:
        idx = evidence.topk(min(top_m, S), dim=-1).indices
        return torch.zeros_like(evidence, dtype=torch.bool).scatter(-1, idx, True)
    if mass >= 1.0:
        return torch.ones_like(evidence, dtype=torch.bool)
    p = torch.softmax(evidence / temperature, dim=-1)
    ps, order = p.sort(dim=-1, descending=True)
    keep = (ps.cumsum(-1) - ps) < mass  # the most probable adapter is always kept
    return torch.zeros_like(keep).scatter(-1, order, keep)


def allowed_units(x_shape: tuple[int, ...], h: torch.Tensor, source: torch.Tensor, mean: torch.Tensor,
                  var: torch.Tensor, *, ctx: HierContext | None, evidence: str, top_m: int, mass: float | None,
                  temperature: float, is_first: bool) -> torch.Tensor:
    """bool [N, R]: the units whose source adapter is chosen for each token's sequence."""
    mask = token_mask(x_shape, ctx, h.device)
    B, T = mask.shape
    ev = causal_evidence(gaussian_loglik(h, mean, var).reshape(B, T, -1), mask)
    if evidence == "depth" and ctx is not None:
        if is_first or ctx.evidence is None or ctx.evidence.shape != ev.shape:
            ctx.evidence = ev
        else:
            ctx.evidence = ctx.evidence + ev
        ev = ctx.evidence
    chosen = choose_sources(ev.reshape(B * T, -1), top_m=top_m, mass=mass, temperature=temperature)
    return chosen[:, source]
