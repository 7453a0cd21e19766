"""Centroids -> merged units, and the three reweighting options.

A cluster C_j's centroid is the mean of its members' vectors u_i = [a_i ; b_i] (in the pool's vector
form, members sign-aligned by sign-invariant k-means), ā_j = Σ_i W_ij a_i, b̄_j = Σ_i W_ij b_i with
W_ij = sign_i / |C_j| for members; the merged module is Σ_j s_j b̄_j ā_jᵀ for per-cluster scales s.

For the target T (the weighted average, ``pool.py``): G_jl = ⟨b̄_j ā_jᵀ, b̄_l ā_lᵀ⟩ = (b̄_jᵀb̄_l)(ā_jᵀā_l)
and h_j = ⟨b̄_j ā_jᵀ, T⟩, so ‖Σ_j s_j b̄_j ā_jᵀ − T‖²_F = sᵀGs − 2sᵀh + ‖T‖²; G and h are products of W
with the pool's N×N Grams (O(N²k), no O(N·d) pass).

- ``paper`` — the dual reweighting as both public implementations have it (TARA-Merge
  ``LoRA_LEGO``, MoEA-Trainer ``lego/merger.py``):
  *parameter reweighting* (norm decay): the centroid vector [ā_j ; b̄_j] is multiplied by
  ρ_j = mean_{i∈C_j} ‖u_i‖_∞ / ‖[ā_j ; b̄_j]‖_∞ (max-abs over the whole concatenated vector), so both
  halves grow by ρ_j and the unit by ρ_j²;
  *output reweighting* (variance expansion): the merged ΔW is multiplied by √(r / k), r the inputs'
  (mean) rank, k the number of clusters (1 at the default k = r).  So s_j = ρ_j² · √(r / k).
  The max-abs norms need the vectors: members' once per unit from the factors (``pool.linf``),
  centroids' from the centroid factors, which are formed anyway (:func:`centroids`).
- ``lsq``: s = G⁺h, the exact minimiser of ‖Σ_j s_j b̄_j ā_jᵀ − T‖_F (pseudo-inverse for singular G).
- ``none``: s_j = 1, the raw cluster means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergekit_lora.threads import NO_BUDGET, ThreadBudget

from .pool import PoolBatch

REWEIGHTS = ("paper", "lsq", "none")


@dataclass(frozen=True)
class ClusterStats:
    """One module's clusters, in the sorted pool order; float64 on the CPU except ``W``."""

    W: torch.Tensor  # [N, k] centroid j = Σ_i W_ij u_i (sign_i / |C_j| for members, else 0)
    G: torch.Tensor  # [k, k] ⟨c_j, c_l⟩ of the centroid units c_j = b̄_j ā_jᵀ
    h: torch.Tensor  # [k] ⟨c_j, T⟩
    sizes: torch.Tensor  # [k] members per cluster (0: empty cluster -> zero unit)
    member_linf: torch.Tensor  # [k] mean over members of ‖u_i‖_∞ (0 for an empty cluster)
    cos: torch.Tensor  # [N] cosine of each (signed) pooled vector to its centroid


def member_weights(H: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """[N, k] weight of each member in its cluster mean: 1/|C_j|, or with ``source`` (the input of each
    unit) input-balanced: 1 / (inputs in C_j × members of that input in C_j), so every input present in a
    cluster counts once however many of its units landed there."""
    if source is None:
        return H / H.sum(0).clamp_min(1)[None, :]
    S = torch.nn.functional.one_hot(source.to(H.device).long()).to(H.dtype)  # [N, n_inputs]
    per_input = S.T @ H  # [n_inputs, k] members of input t in cluster j
    n_inputs = (per_input > 0).sum(0).to(H.dtype)  # [k]
    own = (S @ per_input).clamp_min(1)  # [N, k] members of unit i's input in cluster j
    return H / own / n_inputs.clamp_min(1)[None, :]


def cluster_stats(KA: torch.Tensor, KB: torch.Tensor, labels: torch.Tensor, signs: torch.Tensor, k: int,
                  linf: torch.Tensor, target_scale: float, source: torch.Tensor | None = None) -> ClusterStats:
    """Centroids of the whole vectors [a; b] (also when clustering used a part only), from the sorted
    Grams KA, KB [N, N] of one module's averaged vectors; ``labels``/``signs`` [N] from k-means,
    ``linf`` [N] the members' max-abs norms, T = ``target_scale`` × (sum of the pooled units);
    ``source`` [N]: input-balanced cluster means (:func:`member_weights`)."""
    dt = KA.dtype
    lab = labels.to(KA.device)
    H = torch.nn.functional.one_hot(lab, k).to(dt)  # [N, k]
    sizes = H.sum(0)
    W = member_weights(H, source) * signs.to(KA.device, dt)[:, None]
    KAW, KBW = KA @ W, KB @ W  # [N, k]
    CA, CB = (W.T @ KAW).double(), (W.T @ KBW).double()  # centroid Grams ā_jᵀā_l, b̄_jᵀb̄_l
    G = CA * CB
    h = target_scale * (KAW.double() * KBW.double()).sum(0)  # Σ_i (ā_jᵀa_i)(b̄_jᵀb_i): signs cancel per unit
    vnorm = torch.diagonal(KA + KB).double().clamp_min(0).sqrt()
    cnorm = torch.diagonal(CA + CB).clamp_min(0).sqrt()
    member_linf = W.abs().double().cpu().T @ linf.double().cpu()  # the same (weighted) mean as the centroid
    dots = (KAW + KBW).double().gather(1, lab[:, None])[:, 0] * signs.to(KA.device).double()
    denom = vnorm * cnorm[lab]
    cos = torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1), torch.ones_like(denom))
    return ClusterStats(W, G.cpu(), h.cpu(), sizes.long().cpu(), member_linf, cos.cpu())


def centroids(pool: PoolBatch, stats: list[ClusterStats], threads: ThreadBudget = NO_BUDGET
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unscaled centroid factors of the whole batch (two bmm): ā [M, k, d_in], b̄ [M, d_out, k], and
    each centroid vector's max-abs norm ‖[ā_j ; b̄_j]‖_∞ [M, k] (float64, CPU)."""
    W = pool.unsort(torch.stack([st.W for st in stats]))  # [M, N, k] over the input-order units
    M, N, d_in = pool.A.shape
    A_c = threads.matmul((W * pool.ca[:, :, None]).transpose(1, 2).contiguous(), pool.A)  # the centroid factors
    B_c = threads.matmul(pool.B, W * pool.cb[:, :, None])
    g = math.gcd(B_c.shape[1], 8)  # B_c's columns are k wide: g row-groups side by side reduce faster (exact)
    # max |x| as max(max x, −min x): the same values, no |x| temporary (abs_ last: −0 → +0, NaN stays NaN)
    Bg = B_c.reshape(M, -1, g * B_c.shape[2])
    b_linf = torch.maximum(Bg.amin(1).neg_(), Bg.amax(1)).reshape(M, g, -1).amax(1)
    a_linf = torch.maximum(A_c.amin(2).neg_(), A_c.amax(2))
    linf = torch.maximum(a_linf, b_linf).abs_().double().cpu()
    return A_c, B_c, linf


def option_scales(st: ClusterStats, centroid_linf: torch.Tensor, mean_rank: float, target_norm2: float
                  ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Scales s [k] and the squared error ‖Σ s_j c_j − T‖² for each option (float64)."""
    G, h = st.G, st.h
    k = G.shape[0]
    ok = centroid_linf > 0
    rho = torch.where(ok, st.member_linf / torch.where(ok, centroid_linf, 1), torch.zeros_like(centroid_linf))
    scales = {
        "paper": rho**2 * (mean_rank / k) ** 0.5,
        "lsq": torch.linalg.pinv(G, hermitian=True) @ h,
        "none": torch.ones(k, dtype=torch.float64),
    }
    err2 = {name: max(float(s @ G @ s - 2 * s @ h) + target_norm2, 0.0) for name, s in scales.items()}
    return scales, err2
