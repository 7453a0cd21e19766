"""Dense float64 re-implementations of the 2025 LoRA merges, step by step as the reference code does them.

Each works on dense m×n task matrices (numpy) and follows the reference procedure (Core Space merging,
KnOTS, TSV-M, Iso-C/CTS; read from their public code), except where noted: TIES keeps exactly int(ρN)
entries (the reference keeps int(ρN)+1), DARE masks are drawn as our pipeline draws them (uniform
float32 draws < ρ from the module's seeded generator, inputs in order), and where the reference
depends on arbitrary null-space completions (full-space TSV / Iso on LoRAs) the oracle is the core /
"clean" variant (each task's r_t triplets; Iso over the sum's R = Σ r_t directions).
"""

from __future__ import annotations

import numpy as np
import torch


def dense(units, weights):
    """w_t ΔW_t per task (float64 numpy)."""
    return [float(w) * (u.B.double() @ u.A.double()).numpy() for u, w in zip(units, weights)]


def svd(x):
    return np.linalg.svd(x, full_matrices=False)


def signed(u, vh=None):
    """Sign convention of the factor-space code: each column of u has its largest-|entry| positive (first)."""
    idx = np.abs(u).argmax(0)
    sg = np.sign(u[idx, np.arange(u.shape[1])])
    sg[sg == 0] = 1
    return (u * sg, None) if vh is None else (u * sg, vh * sg[:, None])


def polar(x):
    u, _, vh = svd(x)
    return u @ vh


# ---------------------------------------------------------------------------------------- TIES / DARE primitives
def trim(x, density):
    """Keep the int(ρ·N) largest |entries| (ρ = 1: everything)."""
    if density >= 1:
        return x.copy()
    k = int(density * x.size)
    if k == 0:
        return np.zeros_like(x)
    thr = np.sort(np.abs(x).ravel())[::-1][k - 1]
    return np.where(np.abs(x) >= thr, x, 0.0)


def dare(xs, density, gen):
    """x ⊙ Bernoulli(ρ) / ρ per task, masks drawn from ``gen`` in task order."""
    if density >= 1:
        return [x.copy() for x in xs]
    out = []
    for x in xs:
        mask = (torch.rand(*x.shape, generator=gen, dtype=torch.float32) < density).numpy()
        out.append(x * mask / density)
    return out


def elect_and_mean(xs, method="total"):
    """Sign election (sum of values, or of signs) and the disjoint mean over strictly agreeing entries."""
    mass = sum(xs) if method == "total" else sum(np.sign(x) for x in xs)
    e = np.sign(mass)
    e[e == 0] = 1
    kept = [np.where(x * e > 0, x, 0.0) for x in xs]
    cnt = sum((k != 0).astype(float) for k in kept)
    return sum(kept) / np.maximum(cnt, 1)


def ties(xs, density, method="total", scale=1.0):
    return scale * elect_and_mean([trim(x, density) for x in xs], method)


# ---------------------------------------------------------------------------------------- Core Space
def core_bases(units, weights):
    """U_B_ref (left singular vectors of B_stack), Vh_A_ref (right singular vectors of A_stack): dense SVDs."""
    Bs = np.hstack([float(w) * u.B.double().numpy() for u, w in zip(units, weights)])
    As = np.vstack([u.A.double().numpy() for u in units])
    return signed(svd(Bs)[0])[0], signed(svd(As)[2].T)[0].T


def core_merge(units, weights, fn):
    """U_B_ref · fn([M_1 … M_T]) · Vh_A_ref with M_t = U_B_refᵀ w_tΔW_t Vh_A_refᵀ (CORE get_core_matrices)."""
    UB, VhA = core_bases(units, weights)
    Ms = [UB.T @ d @ VhA.T for d in dense(units, weights)]
    return UB @ fn(Ms) @ VhA


# ---------------------------------------------------------------------------------------- KnOTS
def knots(units, weights, fn, tol=1e-5):
    """C = [w_1ΔW_1 | …] = U S Vh; keep s > tol·s_max; X_t = diag(s) V_tᵀ; ΔW = U · fn([X_t])."""
    ds = dense(units, weights)
    n = ds[0].shape[1]
    U, s, Vh = svd(np.hstack(ds))
    k = int((s > tol * s[0]).sum())
    U, Vh = signed(U[:, :k], Vh[:k])
    Xs = [s[:k, None] * Vh[:k, t * n:(t + 1) * n] for t in range(len(ds))]
    return U[:, :k] @ fn(Xs)


# ---------------------------------------------------------------------------------------- TSV-M (clean)
def tsv(units, weights):
    """Per task thin SVD, its r_t triplets; polar(U_cat) diag(s_cat) polar(V_cat)ᵀ."""
    us, ss, vs = [], [], []
    for u, d in zip(units, dense(units, weights)):
        uu, s, vh = svd(d)
        r = u.rank
        us.append(uu[:, :r])
        ss.append(s[:r])
        vs.append(vh[:r].T)
    return polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T


# ---------------------------------------------------------------------------------------- Iso
def iso_c(units, weights, rank=None):
    """Σ w_tΔW_t = U S Vh; the top R = Σ r_t directions with every σ := mean of those R values."""
    R = sum(u.rank for u in units)
    U, S, Vh = svd(sum(dense(units, weights)))
    k = R if rank is None else rank
    return S[:R].mean() * U[:, :k] @ Vh[:k]


def iso_cts_steps(taus, fraction):
    """ISO iso_cts steps 1–6 on the task matrices ``taus`` (p×q each, k = min(p, q))."""
    T = len(taus)
    k = min(taus[0].shape)
    c = int(k * fraction)
    ts_total = round((k - c) / T) * T
    c = k - ts_total
    n_t = int((k - c) / T)
    u, s, vh = svd(sum(taus))
    Uc, Sc, Vc = u[:, :c], s[:c], vh[:c]
    U, S, V = [], [], []
    for tau in taus:
        ut, st, vt = svd(tau - Uc @ Uc.T @ tau)
        U.append(ut[:, :n_t])
        S.append(st[:n_t])
        V.append(vt[:n_t])
    U = np.hstack([*U, Uc])
    S = np.concatenate([*S, Sc])
    V = np.vstack([*V, Vc])
    return polar(U) @ np.diag(np.full(S.shape, S.mean())) @ polar(V.T).T


def iso_cts(units, weights, fraction=0.8):
    """Core Iso-CTS: the steps on the core matrices M_t (k = R), mapped back with the core bases."""
    return core_merge(units, weights, lambda Ms: iso_cts_steps(Ms, fraction))
