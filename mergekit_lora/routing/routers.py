"""Routers: which of a module's R pooled units each token activates, and with what weight.

All routers work on a batch of tokens at once (h [N, d_in], y = h Aᵀ [N, R]) with ``torch.topk``:
no Python loop over tokens.

- ``implicit`` (FlyLoRA-style, training-free): s_i(x) = |a_i·x|·‖b_i‖, score_i = s_i / mean_j s_j
  + d_i.  Unit i adds b_i (a_i·x) to the output, a vector of norm exactly s_i, so without bias the
  top-k by this score keeps the k largest terms of Σ_i b_i (a_i·x): the best k-term approximation of
  the full (cat) update for that token when the terms are orthogonal (the output error is then the
  norm of the dropped terms), and a greedy one otherwise.  Dividing by the token's mean score keeps
  the ranking and makes the bias d scale-free.  Active units contribute with weight 1, so
  top-k = R is exactly the ``cat`` merge.
- ``gate`` (SMoRA-style): logits l_i(x) = |g_i·x| / ‖x‖ from a gate matrix G [R, d_in]; top-k by
  l + d; active units are weighted by k·softmax(l_active / T) (mean weight 1).  The absolute value
  makes the gate sign-invariant like the units themselves ((b, a) ~ (−b, −a)).  G starts from the
  units (g_i = a_i‖b_i‖ / max_j ‖a_j‖‖b_j‖), so before calibration it selects exactly what the
  implicit router selects; calibration then fits G (and d).
- ``hierarchical`` (HiLoRA-style, training-free): first a sequence-level choice of source adapters
  (``routing/hierarchical.py``), then the implicit score among the chosen adapters' units only.

The bias d shifts selection only, never the output (FlyLoRA / aux-loss-free load balancing).

A selection is (idx, w): idx [N, k] the active units (None: all R units), w the weights aligned
with idx ([N, k]) or, when idx is None, [N, R] / [R] (None: every weight 1).  :func:`apply_units`
turns it into the update (y ⊙ w) Bᵀ either with a dense masked matmul or, when k ≪ R, with an
``embedding_bag`` that reads only the k selected columns of B per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..units import RankUnits

EPS = 1e-12
Selection = tuple[torch.Tensor | None, torch.Tensor | None]


def init_gate(units: RankUnits) -> torch.Tensor:
    """Training-free gate: g_i = a_i‖b_i‖ / max_j ‖a_j‖‖b_j‖ (same ranking as the implicit router)."""
    A = units.A.float()
    bn = units.B.float().norm(dim=0)
    strength = A.norm(dim=1) * bn
    top = strength.max().clamp_min(EPS) if strength.numel() else torch.tensor(1.0)
    return A * (bn / top)[:, None]


def gate_logits(h: torch.Tensor, gate: torch.Tensor | None = None, raw: torch.Tensor | None = None) -> torch.Tensor:
    """|G x| / ‖x‖ per token: [N, R], scale-free in x (``raw`` = h Gᵀ when already computed)."""
    gx = raw if raw is not None else h @ gate.T  # type: ignore[union-attr]
    return gx.abs() / h.norm(dim=-1, keepdim=True).clamp_min(EPS)


def implicit_score(y: torch.Tensor, b_norm: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """|y|·‖b‖ / mean_j(|y_j|·‖b_j‖) + d per token: [N, R]."""
    strength = y.abs() * b_norm
    return torch.addcdiv(bias, strength, strength.mean(dim=-1, keepdim=True).clamp_min(EPS))


def select(router: str, h: torch.Tensor, y: torch.Tensor, *, b_norm: torch.Tensor, bias: torch.Tensor, top_k: int,
           temperature: float = 1.0, gate: torch.Tensor | None = None, gate_raw: torch.Tensor | None = None,
           allowed: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                           torch.Tensor | None]:
    """(idx, w, gate logits) for one batch of tokens; see the module docstring for (idx, w).

    ``allowed`` [N, R] bool (hierarchical router): units outside it are never active (weight 0 if
    fewer than k units are allowed).
    """
    R = y.shape[-1]
    k = min(int(top_k), R)
    if router in ("implicit", "hierarchical"):
        if allowed is None and k >= R:
            return None, None, None
        score = implicit_score(y, b_norm, bias)
        if allowed is None:
            return score.topk(k, dim=-1).indices, None, None
        idx = score.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
        return idx, allowed.gather(-1, idx).to(y.dtype), None
    if router != "gate" or (gate is None and gate_raw is None):
        raise ValueError(f"router {router!r} needs {'a gate matrix' if router == 'gate' else 'to be a known router'}")
    logits = gate_logits(h, None if gate is None else gate.to(h.dtype), gate_raw)
    if k >= R:
        return None, k * torch.softmax(logits / temperature, dim=-1), logits
    idx = (logits + bias).topk(k, dim=-1).indices
    return idx, k * torch.softmax(logits.gather(-1, idx) / temperature, dim=-1), logits


def dense_weights(sel: Selection, y: torch.Tensor) -> torch.Tensor:
    """The selection as a dense weight matrix w [N, R] (zero for inactive units)."""
    idx, w = sel
    if idx is None:
        return torch.ones_like(y) if w is None else w.expand_as(y)
    return torch.zeros_like(y).scatter(-1, idx, 1.0 if w is None else w)


def apply_units(y: torch.Tensor, B: torch.Tensor, sel: Selection, *, Bt: torch.Tensor | None = None,
                sparse: bool = False) -> torch.Tensor:
    """Σ_active w_i y_i b_i per token: [N, d_out].  ``sparse`` gathers the k selected columns of B
    (``Bt`` = Bᵀ contiguous) with one ``embedding_bag`` instead of a dense [N, R] × [R, d_out] matmul."""
    idx, w = sel
    if idx is None:
        return (y if w is None else y * w) @ B.T
    coef = y.gather(-1, idx)
    if w is not None:
        coef = coef * w
    if sparse:
        return F.embedding_bag(idx, Bt if Bt is not None else B.T.contiguous(), per_sample_weights=coef, mode="sum")
    return torch.zeros_like(y).scatter(-1, idx, coef) @ B.T


def route_weights(router: str, h: torch.Tensor, y: torch.Tensor, *, b_norm: torch.Tensor, bias: torch.Tensor,
                  top_k: int, temperature: float = 1.0,
                  gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token unit weights w [N, R] (zero for inactive units) and the gate logits (gate router).

    The routed update is (y ⊙ w) Bᵀ.  For the implicit router with top_k >= R every weight is 1.
    """
    idx, w, logits = select(router, h, y, b_norm=b_norm, bias=bias, top_k=top_k, temperature=temperature,
                            gate=gate)
    return dense_weights((idx, w), y), logits
