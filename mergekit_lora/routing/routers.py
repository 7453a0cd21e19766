"""Routers: which of a module's R pooled units each token activates, and with what weight.

Both routers work on a batch of tokens at once (h [N, d_in], y = h Aᵀ [N, R]) with ``torch.topk``
and ``scatter``: no Python loop over tokens.

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

The bias d shifts selection only, never the output (FlyLoRA / aux-loss-free load balancing).
"""

from __future__ import annotations

import torch

from ..units import RankUnits

EPS = 1e-12


def init_gate(units: RankUnits) -> torch.Tensor:
    """Training-free gate: g_i = a_i‖b_i‖ / max_j ‖a_j‖‖b_j‖ (same ranking as the implicit router)."""
    A = units.A.float()
    bn = units.B.float().norm(dim=0)
    strength = A.norm(dim=1) * bn
    top = strength.max().clamp_min(EPS) if strength.numel() else torch.tensor(1.0)
    return A * (bn / top)[:, None]


def gate_logits(h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """|G x| / ‖x‖ per token: [N, R], scale-free in x."""
    return (h @ gate.T).abs() / h.norm(dim=-1, keepdim=True).clamp_min(EPS)


def route_weights(router: str, h: torch.Tensor, y: torch.Tensor, *, b_norm: torch.Tensor, bias: torch.Tensor,
                  top_k: int, temperature: float = 1.0,
                  gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token unit weights w [N, R] (zero for inactive units) and the gate logits (gate router).

    The routed update is (y ⊙ w) Bᵀ.  For the implicit router with top_k >= R every weight is 1.
    """
    R = y.shape[-1]
    k = min(int(top_k), R)
    if router == "implicit":
        if k >= R:
            return torch.ones_like(y), None
        strength = y.abs() * b_norm
        score = strength / strength.mean(dim=-1, keepdim=True).clamp_min(EPS) + bias
        idx = score.topk(k, dim=-1).indices
        return torch.zeros_like(y).scatter(-1, idx, 1.0), None
    if router != "gate" or gate is None:
        raise ValueError(f"router {router!r} needs {'a gate matrix' if router == 'gate' else 'to be implicit or gate'}")
    logits = gate_logits(h, gate.to(h.dtype))
    if k >= R:
        return k * torch.softmax(logits / temperature, dim=-1), logits
    idx = (logits + bias).topk(k, dim=-1).indices
    active = logits.gather(-1, idx)
    w = k * torch.softmax(active / temperature, dim=-1)
    return torch.zeros_like(y).scatter(-1, idx, w), logits
