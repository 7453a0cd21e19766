"""Fit the hierarchical router's per-adapter input profiles, and pick one adapter per request.

:func:`fit_profiles` runs a few unlabeled examples of each source adapter's domain through the model
with the routed adapter attached (``routing/hierarchical.py`` has the math) and stores, per routed
module, the mean and floored variance of the module's input under each source.
:func:`select_adapter` is the request-level selector for serving runtimes that cannot route: it scores
each request against the profiles and names the adapter to serve it with (its own static LoRA).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraMergeError
from ..progress import progress_bar
from .calibrate import Batch, load_examples, make_batches
from .hierarchical import HierContext
from .runtime import Attached, RoutedLoraLayer


def load_profile_data(paths: Sequence[str | Path], *, base: str | Path | None = None, max_length: int = 128,
                      batch_size: int = 8, vocab_size: int | None = None) -> list[list[Batch]]:
    """One list of batches per source adapter from its JSONL file (rows as for calibration; labels unused)."""
    return [make_batches(load_examples(p, base=base, max_length=max_length, vocab_size=vocab_size), batch_size)
            for p in paths]


def _hier_layers(attached: Attached) -> tuple[HierContext, list[RoutedLoraLayer]]:
    layers = [la for la in attached.layers.values() if la.router == "hierarchical"]
    if not layers or attached.context is None:
        raise LoraMergeError("profiles are for the hierarchical router; route with router=\"hierarchical\"")
    return attached.context, layers


@torch.no_grad()
def fit_profiles(model: nn.Module, attached: Attached,
                 data_per_adapter: Sequence[Sequence[Batch]] | Mapping[int, Sequence[Batch]], *,
                 device: torch.device | None = None, through: str = "adapter", var_floor: float = 0.05,
                 covariance: str = "diag", progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fit μ_s, σ²_s [S, d_in] of every hierarchical layer's input per source s, in place.

    ``data_per_adapter[s]``: batches of unlabeled examples of source s's domain (s = the index of the
    input adapter, in the order of the routed adapter's sources).  ``through="adapter"`` profiles
    source s with exactly adapter s active in every routed module; ``"base"`` with no update (the
    base model's inputs).  σ²_s gets a floor of ``var_floor`` × its mean over dimensions;
    ``covariance="pooled"`` gives every source the mean of the S variances (a shared diagonal
    covariance: the choice becomes a nearest-mean rule in that metric, and a source with broad inputs
    no longer wins every atypical sequence).  Returns
    module name -> (mean, var); ``attached.routed(...)`` then carries them into the routed file.
    """
    if through not in ("adapter", "base"):
        raise ValueError(f"through={through!r} must be 'adapter' or 'base'")
    if covariance not in ("diag", "pooled"):
        raise ValueError(f"covariance={covariance!r} must be 'diag' or 'pooled'")
    if not var_floor > 0:
        raise ValueError("var_floor must be positive")
    ctx, layers = _hier_layers(attached)
    S = max(la.spec.n_sources for la in layers)
    data = dict(data_per_adapter) if isinstance(data_per_adapter, Mapping) else dict(enumerate(data_per_adapter))
    missing = [s for s in range(S) if not data.get(s)]
    if missing:
        raise LoraMergeError(f"profile data is missing for input adapter(s) {', '.join(map(str, missing))}; "
                             "the hierarchical router needs a few examples of every input's domain")
    device = device or next(model.parameters()).device
    names = {id(la): n for n, la in attached.layers.items()}
    for la in layers:
        la.prof_stats = {}
    try:
        ctx.profiling = True
        with progress_bar(progress) as bar:
            task = bar.add_task("profiling adapters", total=sum(len(data[s]) for s in range(S)))
            for s in range(S):
                ctx.force = s if through == "adapter" else -1
                for b in data[s]:
                    b = b.to(device)
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                    bar.advance(task)
                for la in layers:  # statistics were collected under key ctx.force; file them under s
                    if ctx.force != s and ctx.force in la.prof_stats:
                        la.prof_stats[s] = la.prof_stats.pop(ctx.force)
    finally:
        ctx.profiling = False
        ctx.force = None
    out = {}
    for la in layers:
        means, vars_ = [], []
        for s in range(S):
            n, sx, sxx = la.prof_stats.get(s, (0.0, None, None))
            if sx is None or float(n) < 1:
                raise LoraMergeError(f"module {names[id(la)]}: no real tokens in the profile data of adapter {s}")
            mu = sx / n
            var = (sxx / n - mu * mu).clamp_min(0)
            var = var + var_floor * var.mean().clamp_min(1e-12)
            means.append(mu.float())
            vars_.append(var.float())
        var_s = torch.stack(vars_)
        if covariance == "pooled":
            var_s = var_s.mean(0, keepdim=True).expand_as(var_s).clone()
        la.profile_mean = torch.stack(means).to(la.unit_A.device)
        la.profile_var = var_s.to(la.unit_A.device)
        la.prof_stats = {}
        out[names[id(la)]] = (la.profile_mean.cpu(), la.profile_var.cpu())
    return out


@torch.no_grad()
def select_adapter(model: nn.Module, attached: Attached, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The request-level selector: for each sequence [B], the source adapter with the highest evidence.

    The evidence is the depth-summed causal mean log-likelihood at the last real token, measured by the
    attached (profiled) hierarchical layers in one forward pass; serve the request with that adapter.
    """
    ctx, layers = _hier_layers(attached)
    if any(la.profile_mean is None for la in layers):
        raise LoraMergeError("the routed adapter has no profiles; fit them with profile data first")
    seen: list[torch.Tensor] = []

    def grab(mod: nn.Module, _inp: tuple, _out: torch.Tensor) -> None:
        if mod.ctx is not None and mod.ctx.evidence is not None:
            seen.append(mod.ctx.evidence)

    last = [la for la in layers if la.spec.evidence == "depth"][-1:] or layers
    h = last[-1].register_forward_hook(grab)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        h.remove()
    if not seen:
        raise LoraMergeError("no evidence was recorded; select_adapter needs evidence=\"depth\"")
    ev = seen[-1]  # [B, T, S]
    if attention_mask is not None:  # the last real token of each row (left or right padding)
        pos = (attention_mask * torch.arange(attention_mask.shape[1], device=attention_mask.device)).argmax(1)
    else:
        pos = torch.full((ev.shape[0],), ev.shape[1] - 1, device=ev.device)
    return ev[torch.arange(ev.shape[0], device=ev.device), pos].argmax(-1)
