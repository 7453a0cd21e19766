"""Centroids -> merged units, and the three reweighting options, all in factor space.

For centroid units c_j = b_j a_jᵀ and the target T = Σ_i w_i ΔW_i (the pooled units p_i = β_i α_iᵀ):
G_jl = ⟨c_j, c_l⟩ = (b_jᵀb_l)(a_jᵀa_l) and h_j = ⟨c_j, T⟩ = Σ_i (b_jᵀβ_i)(a_jᵀα_i), so for scales s
‖Σ_j s_j c_j − T‖²_F = sᵀGs − 2sᵀh + ‖T‖²: every option's error costs a k×k and a k×N product.

- ``none``: s_j = 1 (the raw centroids).
- ``paper`` (dual reweighting, Zhao et al. 2025).  The paper's exact equations were not available to us
  verbatim (only its abstract and summaries, which name "parameter reweighting for norm decay" and
  "output reweighting for variance expansion"); this is our most faithful reading:
  *parameter reweighting* against norm decay: averaging the vectors v_i = [b_i; a_i] of a cluster
  shrinks the norm (‖mean v‖ ≤ mean ‖v‖), so each centroid vector is rescaled to the mean norm of its
  members, ρ_j = mean_{i∈C_j} ‖v_i‖ / ‖c̄_j‖ (both b_j and a_j grow by ρ_j, the unit by ρ_j²);
  *output reweighting* against variance expansion: a LoRA output is a sum of per-rank terms, so
  with roughly independent terms its variance grows with the rank; the merged rank-k update is scaled
  by √(r / k), r the inputs' (mean) rank, to keep the output variance of a rank-r LoRA.
  So s_j = ρ_j² · √(r / k).
- ``lsq``: s = G⁺h, the exact minimiser of ‖Σ_j s_j c_j − T‖_F (pseudo-inverse for singular G).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REWEIGHTS = ("paper", "lsq", "none")


@dataclass(frozen=True)
class Centroids:
    A: torch.Tensor  # [k, d_in]
    B: torch.Tensor  # [d_out, k]
    sizes: torch.Tensor  # [k] members per cluster (0: empty cluster -> zero unit)
    rho: torch.Tensor  # [k] parameter-reweighting factor (mean member norm / centroid norm)
    cos: torch.Tensor  # [N] cosine of each pooled vector to its centroid


def centroids(V: torch.Tensor, labels: torch.Tensor, k: int, d_out: int) -> Centroids:
    """Member means of the full vectors [b; a] (also when clustering used the A- or B-part only)."""
    lab = labels.to(V.device)
    onehot = torch.nn.functional.one_hot(lab, k).to(V.dtype)  # [N, k]
    sizes = onehot.sum(0)
    C = (onehot.T @ V) / sizes.clamp_min(1)[:, None]
    vnorm = V.norm(dim=1)
    mean_norm = (onehot.T @ vnorm) / sizes.clamp_min(1)
    cnorm = C.norm(dim=1)
    rho = torch.where(cnorm > 0, mean_norm / torch.where(cnorm > 0, cnorm, 1), torch.zeros_like(cnorm))
    Cm = C[lab]
    denom = vnorm * Cm.norm(dim=1)
    cos = torch.where(denom > 0, (V * Cm).sum(1) / torch.where(denom > 0, denom, 1), torch.ones_like(denom))
    return Centroids(C[:, d_out:], C[:, :d_out].T, sizes.long().cpu(), rho, cos.cpu())


def option_scales(c: Centroids, pool_A: torch.Tensor, pool_B: torch.Tensor, mean_rank: float,
                  target_norm2: float) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scales s [k] and the squared error ‖Σ s_j c_j − T‖² for each option (float64)."""
    A, B = c.A.double(), c.B.double()
    G = (B.T @ B) * (A @ A.T)
    h = ((B.T @ pool_B.double()) * (A @ pool_A.double().T)).sum(1)
    k = A.shape[0]
    scales = {
        "none": torch.ones(k, dtype=torch.float64, device=A.device),
        "paper": c.rho.double() ** 2 * (mean_rank / k) ** 0.5,
        "lsq": torch.linalg.pinv(G, hermitian=True) @ h,
    }
    err2 = {name: max(float(s @ G @ s - 2 * s @ h) + target_norm2, 0.0) for name, s in scales.items()}
    return scales, err2
