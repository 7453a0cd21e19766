"""``lego``: LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO", ICLR 2025, arXiv 2409.16167)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_lora.adapter import Adapter
from mergekit_lora.kmeans import kmeans, resolve_backend
from mergekit_lora.registry import Algorithm, ModuleContext, register
from mergekit_lora.units import RankUnits

from .params import LegoParams
from .pool import Pool, build_pool
from .report import ModuleRecord, fidelity_section, report_files
from .reweight import centroids, option_scales


@register
class Lego(Algorithm):
    """Rank-wise k-means over the pooled canonical rank units of all inputs; centroids become units.

    Per module: every rank unit of every input (after its input weight) is one vector [b_i; a_i] in
    canonical form (``pool.py``); k-means (k-means++ seeds from the module's seeded generator,
    ``n_init`` restarts, Lloyd, deterministic empty-cluster re-seeding) groups them into k clusters
    (``space``: whole vector as in the paper, or the A-/B-part); each cluster's mean vector is one unit
    b̄_j ā_jᵀ of the merged rank-k module; then ``reweight`` (``reweight.py``): the paper's dual
    reweighting, exact least-squares scales, or none.  Choices the paper leaves open, all parameters:
    canonical form (balance + sign), the pool order (sorted by content, so results do not depend on
    input order), empty clusters (re-seeded with the farthest point; when fewer distinct units than k
    exist they stay empty and become zero units, so the rank is always k).  k ≥ pooled rank keeps the
    pool itself (exact Σ wᵢ ΔWᵢ, no reweighting).  Same-shape modules are clustered as one batch.
    """

    name = "lego"
    description = "LoRA-LEGO: k-means over all inputs' rank units, centroids -> rank-k LoRA, dual reweighting"
    Params = LegoParams

    def __init__(self) -> None:
        self.records: list[ModuleRecord] = []
        self.labels: list[str] = []
        self.meta: dict = {}
        self._params: LegoParams | None = None

    def prepare(self, adapters: Sequence[Adapter], weights: Sequence[float], params: LegoParams) -> None:  # type: ignore[override]
        self.records, self.labels = [], [a.label for a in adapters]
        self.meta = {"k": params.k if params.k is not None else f"ratio {params.k_ratio}",
                     "reweight": params.reweight, "space": params.space, "backend": params.backend}
        self._params = params

    def batch_limit(self, params: LegoParams) -> int:  # type: ignore[override]
        return params.batch_modules

    def merge_module(self, units: list[RankUnits], weights: list[float], params: LegoParams,  # type: ignore[override]
                     ctx: ModuleContext) -> RankUnits:
        return self.merge_batch([units], [weights], params, [ctx])[0]

    def merge_batch(self, units: list[list[RankUnits]], weights: list[list[float]], params: LegoParams,  # type: ignore[override]
                    ctxs: list[ModuleContext]) -> list[RankUnits]:
        self._params = params
        device = ctxs[0].device
        pools = [build_pool(u, w, canonical=params.canonical, generator=c.generator("lego-order"), device=device)
                 for u, w, c in zip(units, weights, ctxs)]
        out_dtype = [RankUnits.concat(u).A.dtype for u in units]
        sizes = {p.size for p in pools}
        if len(sizes) != 1:  # the driver batches same shapes only; stay correct if called otherwise
            return [r for i in range(len(pools)) for r in
                    self.merge_batch([units[i]], [weights[i]], params, [ctxs[i]])]
        n = sizes.pop()
        k = params.k_for(n)
        if k >= n:
            return [self._exact(p, c.name, dt) for p, c, dt in zip(pools, ctxs, out_dtype)]
        backend = resolve_backend(params.backend, device)
        X = torch.stack([p.features(params.space) for p in pools])
        res = kmeans(X, k, generators=[c.generator("lego-kmeans") for c in ctxs], backend=backend,
                     n_init=params.n_init, max_iter=params.max_iter, device=device)
        return [self._assemble(p, res.labels[m], k, params, c.name, dt)
                for m, (p, c, dt) in enumerate(zip(pools, ctxs, out_dtype))]

    # ------------------------------------------------------------------ per module
    def _exact(self, pool: Pool, name: str, dtype: torch.dtype) -> RankUnits:
        n = pool.size
        self._record(ModuleRecord(name, n, n, True, pool.target.norm_sq(), {o: 0.0 for o in ("paper", "lsq", "none")}),
                     pool, torch.arange(n), torch.ones(n), n)
        return pool.target.to(dtype=dtype)

    def _assemble(self, pool: Pool, labels: torch.Tensor, k: int, params: LegoParams, name: str,
                  dtype: torch.dtype) -> RankUnits:
        c = centroids(pool.V, labels, k, pool.d_out)
        t2 = pool.target.norm_sq()
        scales, err2 = option_scales(c, pool.target.A, pool.target.B, pool.mean_rank, t2)
        s = scales[params.reweight].to(c.B.dtype)
        src = torch.full((k,), -1, dtype=torch.long)
        for j in range(k):
            members = pool.source[labels == j].unique()
            if len(members) == 1:
                src[j] = members[0]
        merged = pool.target.with_factors(c.A, c.B * s[None, :], src).canonical()
        self._record(ModuleRecord(name, pool.size, k, False, t2, err2, c.sizes.tolist()), pool, labels, c.cos, k)
        return merged.to(dtype=dtype)

    def _record(self, rec: ModuleRecord, pool: Pool, labels: torch.Tensor, cos: torch.Tensor, k: int) -> None:
        if self._params is not None and self._params.report:
            onehot = torch.nn.functional.one_hot(labels.cpu(), k)
            rec.sizes = onehot.sum(0).tolist()
            for i in pool.source.unique().tolist():
                rec.input_by_cluster[i] = onehot[pool.source == i].sum(0).tolist()
            for j in range(k):
                cj = cos[labels.cpu() == j]
                rec.cos_mean.append(float(cj.mean()) if len(cj) else 1.0)
                rec.cos_min.append(float(cj.min()) if len(cj) else 1.0)
        self.records.append(rec)

    # ------------------------------------------------------------------ after the merge
    def card_sections(self) -> list[tuple[str, str]]:
        if not self.records:
            return []
        return [fidelity_section(self.records, self._params.reweight if self._params else "paper")]

    def artifacts(self) -> dict[str, str]:
        if not self.records or self._params is None or not self._params.report:
            return {}
        return report_files(self.records, self.labels, self.meta)
