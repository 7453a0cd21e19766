"""Centroids -> merged units, and the three reweighting options, all from the pool's Gram matrices.

For centroid units c_j = b_j a_jᵀ and the target T = Σ_i w_i ΔW_i (the pooled units p_i = β_i α_iᵀ):
G_jl = ⟨c_j, c_l⟩ = (b_jᵀb_l)(a_jᵀa_l) and h_j = ⟨c_j, T⟩ = Σ_i (b_jᵀβ_i)(a_jᵀα_i), so for scales s
‖Σ_j s_j c_j − T‖²_F = sᵀGs − 2sᵀh + ‖T‖².  A centroid is a weighted sum of pooled vectors
(weights W: sign / cluster size), so every one of these numbers is a product of W with the N×N
pool Grams: the options and their errors cost O(N²k), not O(N·d).

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
class ClusterStats:
    """One module's clusters, in the sorted pool order; float64 on the CPU except ``W``."""

    W: torch.Tensor  # [N, k] centroid j = Σ_i W_ij v'_i (sign_i / |C_j| for members, else 0)
    G: torch.Tensor  # [k, k] ⟨c_j, c_l⟩ of the centroid units
    h: torch.Tensor  # [k] ⟨c_j, T⟩
    sizes: torch.Tensor  # [k] members per cluster (0: empty cluster -> zero unit)
    rho: torch.Tensor  # [k] parameter-reweighting factor (mean member norm / centroid norm)
    cos: torch.Tensor  # [N] cosine of each (signed) pooled vector to its centroid


def cluster_stats(KA: torch.Tensor, KB: torch.Tensor, labels: torch.Tensor, signs: torch.Tensor,
                  k: int) -> ClusterStats:
    """Centroids of the full vectors [b; a] (also when clustering used the A- or B-part only), from the
    canonical Grams KA, KB [N, N] of one module; ``labels``/``signs`` [N] from k-means."""
    dt = KA.dtype
    lab = labels.to(KA.device)
    H = torch.nn.functional.one_hot(lab, k).to(dt)  # [N, k]
    sizes = H.sum(0)
    W = H * signs.to(KA.device, dt)[:, None] / sizes.clamp_min(1)[None, :]
    KAW, KBW = KA @ W, KB @ W  # [N, k]
    CA, CB = (W.T @ KAW).double(), (W.T @ KBW).double()  # centroid Grams ā_jᵀā_l, b̄_jᵀb̄_l
    G = CA * CB
    h = (KAW.double() * KBW.double()).sum(0)  # Σ_i (ā_jᵀa'_i)(b̄_jᵀb'_i): signs and balance cancel per unit
    vnorm = torch.diagonal(KA + KB).double().clamp_min(0).sqrt()
    cnorm = torch.diagonal(CA + CB).clamp_min(0).sqrt()
    mean_norm = (H.double().T @ vnorm) / sizes.double().clamp_min(1)
    rho = torch.where(cnorm > 0, mean_norm / torch.where(cnorm > 0, cnorm, 1), torch.zeros_like(cnorm))
    dots = (KAW + KBW).double().gather(1, lab[:, None])[:, 0] * signs.to(KA.device).double()
    denom = vnorm * cnorm[lab]
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1), torch.ones_like(denom))
    return ClusterStats(W, G.cpu(), h.cpu(), sizes.long().cpu(), rho.cpu(), cos.cpu())


def option_scales(st: ClusterStats, mean_rank: float, target_norm2: float
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scales s [k] and the squared error ‖Σ s_j c_j − T‖² for each option (float64)."""
    G, h = st.G, st.h
    k = G.shape[0]
    scales = {
        "none": torch.ones(k, dtype=torch.float64),
        "paper": st.rho ** 2 * (mean_rank / k) ** 0.5,
        "lsq": torch.linalg.pinv(G, hermitian=True) @ h,
    }
    err2 = {name: max(float(s @ G @ s - 2 * s @ h) + target_norm2, 0.0) for name, s in scales.items()}
    return scales, err2
