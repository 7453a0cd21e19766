"""Shared machinery of the elementwise methods (TIES, DARE, magnitude pruning): dense, then refactor.

Elementwise operations (trim by magnitude, random drop, sign election) do not commute with the
factorisation, so these methods form each input's dense ΔW_i = B_i A_i — one module at a time, in
float32 (float64 when an input is float64) — combine them, and refactor the dense result D into k
rank units by a truncated SVD: a seeded randomised low-rank SVD (``torch.svd_lowrank``) by default,
the exact dense SVD with ``exact_svd``.  Each refactorisation's error ‖D − D_k‖/‖D‖ is recorded and
reported by :meth:`DenseAlgorithm.report` (model card and CLI), so a poor low-rank fit is never silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar

import torch
from pydantic import ConfigDict, Field

from mergekit_lora.determinism import one_thread, svd_lowrank
from mergekit_lora.registry import Algorithm, AlgorithmParams, MergedModule, ModuleContext, Notes
from mergekit_lora.units import RankUnits

SignMethod = Literal["total", "frequency"]


class DenseParams(AlgorithmParams):
    """Refactorisation knobs shared by every dense-then-refactor method."""

    density: float = Field(..., gt=0, le=1, description="fraction of each input's ΔW entries kept, in (0, 1]")
    rank: int | None = Field(None, ge=1, description="output rank k (default: the largest input rank)")
    exact_svd: bool = Field(False, description="refactor with the exact dense SVD instead of the randomised one")
    oversample: int = Field(8, ge=0, description="randomised SVD: extra columns beyond k in the range finder")
    niter: int = Field(2, ge=0, description="randomised SVD: power iterations")


P = TypeVar("P", bound=DenseParams)


class SignParams(DenseParams):
    """TIES-style parameters: sign election and the λ scale (``lambda`` in YAML/``-p``, ``--lambda`` on the CLI)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    majority_sign: SignMethod = Field("total", description="elect each entry's sign by total mass or by frequency")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged update")


def dense_deltas(units: Sequence[RankUnits]) -> list[torch.Tensor]:
    """Each input's dense ΔW_i = B_i A_i ([d_out, d_in], functional orientation), float32 or float64."""
    out = []
    for u in units:
        dt = torch.promote_types(torch.promote_types(u.A.dtype, u.B.dtype), torch.float32)
        out.append(u.B.to(dt) @ u.A.to(dt))
    return out


def magnitude_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries whose |value| is among the top ``int(density · numel)`` (ties at the threshold kept)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    mag = t.abs()
    threshold = torch.kthvalue(mag.flatten(), t.numel() - k + 1).values
    return t * (mag >= threshold)


def dare_drop(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` (Bernoulli mask drawn on CPU from ``gen``), rescale by 1/density.

    The mask is drawn as float32 in ``t``'s shape from a CPU generator, so CPU and CUDA runs drop the
    same entries for the same seed.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(tuple(t.shape), density, dtype=torch.float32), generator=gen)
    return t * mask.to(device=t.device, dtype=t.dtype) / density


def elect_and_mean(weighted: Sequence[torch.Tensor], method: SignMethod) -> torch.Tensor:
    """TIES sign election and disjoint mean over the (already weighted) task tensors.

    Elected sign per entry: sign of Σ_i x_i (``total``) or of Σ_i sign(x_i) (``frequency``), +1 on a
    tie; result: the mean of the entries agreeing with it (entries that are 0 never count).
    """
    stack = torch.stack(list(weighted))
    signs = stack.sign()
    mass = stack.sum(0) if method == "total" else signs.sum(0)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(stack.dtype)
    agree = signs == elected
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def low_rank_svd(dense: torch.Tensor, k: int, params: DenseParams, ctx: ModuleContext
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U [m,k], S [k], V [n,k]) of the truncated SVD: exact, or randomised with a seeded generator."""
    m, n = dense.shape
    k = min(k, m, n)
    if params.exact_svd:
        with one_thread(dense.device):  # issue 14: LAPACK bits depend on the thread count
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].T
    q = min(k + params.oversample, m, n)
    seed = ctx.generator("svd_lowrank").initial_seed()
    devices = [dense.device.index or 0] if dense.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        U, S, V = svd_lowrank(dense, q=q, niter=params.niter)  # issue 14: torch's, QRs on one thread
    return U[:, :k], S[:k], V[:, :k]


def refactor(dense: torch.Tensor, like: RankUnits, k: int, params: DenseParams, ctx: ModuleContext
             ) -> tuple[RankUnits, float, float]:
    """Dense D -> k balanced units (b_j = u_j √σ_j, a_j = √σ_j v_j); returns (units, ‖D − D_k‖, ‖D‖)."""
    U, S, V = low_rank_svd(dense, k, params, ctx)
    root = S.clamp(min=0).sqrt()
    B = U * root[None, :]
    A = (V * root[None, :]).T.contiguous()
    err = float((dense - B @ A).double().norm())
    units = replace(like, A=A, B=B.contiguous(), source=torch.full((A.shape[0],), -1, dtype=torch.long),
                    extra={})
    return units, err, float(dense.double().norm())


class DenseAlgorithm(Algorithm[P]):
    """Base of the dense-then-refactor methods: subclasses implement :meth:`dense`, the pre-truncation ΔW.

    Each module's notes carry its refactorisation error² and ‖D‖²; :meth:`report` sums them.
    """

    Params = DenseParams

    def dense(self, units: list[RankUnits], weights: list[float], params: P, ctx: ModuleContext) -> torch.Tensor:
        """The combined dense update D before refactorisation ([d_out, d_in])."""
        raise NotImplementedError

    def merge_module(self, units: list[RankUnits], weights: list[float], params: P,
                     ctx: ModuleContext) -> MergedModule:
        d = self.dense(units, weights, params, ctx)
        k = params.rank or max(u.rank for u in units)  # type: ignore[attr-defined]
        out, err, norm = refactor(d, units[0], k, params, ctx)  # type: ignore[arg-type]
        return MergedModule(out, notes={"err2": err * err, "norm2": norm * norm})

    def report(self, notes: Sequence[tuple[str, Notes]], params: P) -> dict[str, Any]:
        """The refactorisation error ‖D − D_k‖/‖D‖ over all modules (root of summed squares) and the worst."""
        if not notes:
            return {}
        err2 = sum(n["err2"] for _, n in notes)
        norm2 = sum(n["norm2"] for _, n in notes)
        worst = max(((n["err2"] / n["norm2"]) ** 0.5 if n["norm2"] > 0 else 0.0) for _, n in notes)
        p: DenseParams = params  # type: ignore[assignment]
        how = ("exact dense SVD" if p.exact_svd else "randomised SVD"
               + f" (oversample {p.oversample}, {p.niter} power iterations)")
        return {"refactorisation": how,
                "refactor rel. error ‖D−D_k‖/‖D‖ (overall, incl. rank-k truncation)": math.sqrt(err2 / norm2) if norm2 else 0.0,
                "refactor rel. error (worst module)": worst}
