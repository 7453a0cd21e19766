"""``lego``: LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO", ICLR 2025, arXiv 2409.16167)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.kmeans import kmeans_gram, resolve_backend
from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext, Notes
from mergekit_lora.units import RankUnits

from .params import LegoParams
from .pool import PoolBatch, build_pools, pooled_dtype
from .report import ModuleRecord, fidelity_section, report_files
from .reweight import REWEIGHTS, ClusterStats, cluster_stats, option_scales


class Lego(Algorithm[LegoParams]):
    """Rank-wise k-means over the pooled canonical rank units of all inputs; centroids become units.

    Per module: every rank unit of every input (after its input weight) is one vector [b_i; a_i] in
    canonical form (``pool.py``: balanced; the sign is either left to k-means, which treats v and −v as
    the same unit, or fixed by a rule); k-means (k-means++ seeds from the module's seeded generator,
    ``n_init`` restarts, Lloyd, deterministic empty-cluster re-seeding) groups them into k clusters
    (``space``: whole vector as in the paper, or the A-/B-part); each cluster's mean vector (members
    sign-aligned) is one unit b̄_j ā_jᵀ of the merged rank-k module; then ``reweight``
    (``reweight.py``): the paper's dual reweighting, exact least-squares scales, or none.  Choices the
    paper leaves open, all parameters: canonical form, the pool order (sorted by content, so results do
    not depend on input order), empty clusters (re-seeded with the farthest point; when fewer distinct
    units than k exist they stay empty and become zero units, so the rank is always k).  k ≥ pooled
    rank keeps the pool itself (exact Σ wᵢ ΔWᵢ, no reweighting).  Same-shape modules are clustered as
    one batch, and everything but the final centroids is computed from the pool's N×N Gram matrices.
    """

    name = "lego"
    description = "LoRA-LEGO: k-means over all inputs' rank units, centroids -> rank-k LoRA, dual reweighting"
    Params = LegoParams

    def batch_limit(self, params: LegoParams) -> int:
        return params.batch_modules

    def merge_module(self, units: list[RankUnits], weights: list[float], params: LegoParams,
                     ctx: ModuleContext) -> MergedModule:
        return self.merge_batch([units], [weights], params, [ctx])[0]

    def merge_batch(self, units: list[list[RankUnits]], weights: list[list[float]], params: LegoParams,
                    ctxs: list[ModuleContext]) -> list[MergedModule]:
        device = ctxs[0].device
        if len({sum(u.rank for u in us) for us in units}) != 1:  # the driver batches same shapes only
            return [r for i in range(len(units)) for r in self.merge_batch([units[i]], [weights[i]], params, [ctxs[i]])]
        pool = build_pools(units, weights, canonical=params.canonical, signs=params.signs,
                           generators=[c.generator("lego-order") for c in ctxs], device=device)
        out_dtype = [pooled_dtype(us) for us in units]
        n = pool.size
        k = params.k_for(n)
        if k >= n:
            labels = torch.arange(n).expand(len(units), n)
            signs = torch.ones(len(units), n, dtype=torch.float64)
        else:
            res = kmeans_gram(pool.K(params.space), k, generators=[c.generator("lego-kmeans") for c in ctxs],
                              backend=resolve_backend(params.backend, device), n_init=params.n_init,
                              max_iter=params.max_iter, device=device,
                              sign_invariant=params.canonical and params.signs == "invariant")
            labels, signs = res.labels, res.signs_or_ones()
        kk = min(k, n)
        stats = [cluster_stats(pool.KA[m], pool.KB[m], labels[m], signs[m], kk) for m in range(len(units))]
        scales, rows, records = [], [], []
        for m, (st, ctx) in enumerate(zip(stats, ctxs)):
            t2 = float(pool.target_norm2[m])
            if k >= n:
                s, err2 = torch.ones(n, dtype=torch.float64), {o: 0.0 for o in REWEIGHTS}
            else:
                opts, err2 = option_scales(st, pool.mean_rank[m], t2)
                s = opts[params.reweight]
            scales.append(s)
            m2 = float(s @ st.G @ s)
            rows.append(ModuleFidelity(ctx.name, t2**0.5, max(m2, 0.0) ** 0.5, err2[params.reweight] ** 0.5))
            rec = ModuleRecord(ctx.name, n, kk, k >= n, t2, err2, st.sizes.tolist())
            if params.report:
                _detail(rec, pool.source[m], labels[m], st.cos, kk)
            records.append(rec)
        merged = self._assemble(pool, stats, scales, out_dtype)
        return [MergedModule(u, fidelity=row, notes={"record": rec}) for u, row, rec in zip(merged, rows, records)]

    def _assemble(self, pool: PoolBatch, stats: list[ClusterStats], scales: list[torch.Tensor],
                  out_dtype: list[torch.dtype]) -> list[RankUnits]:
        """The merged factors of the whole batch: ā_j = Σ_i W_ij a'_i, b̄_j = s_j Σ_i W_ij b'_i (two bmm)."""
        dt = pool.A.dtype
        W = pool.unsort(torch.stack([st.W for st in stats]))  # [M, N, k] over the input-order units
        S = torch.stack(scales).to(device=W.device, dtype=dt)
        A_out = torch.bmm((W * pool.ca[:, :, None]).transpose(1, 2), pool.A)
        B_out = torch.bmm(pool.B, W * pool.cb[:, :, None] * S[:, None, :])
        out = []
        for m, st in enumerate(stats):
            member = st.W.cpu() != 0  # [N, k]
            src = torch.full((member.shape[1],), -1, dtype=torch.long)
            for j in range(member.shape[1]):
                members = pool.source[m][member[:, j]].unique()
                if len(members) == 1:
                    src[j] = members[0]
            merged = pool.template[m].with_factors(A_out[m], B_out[m], src).canonical()
            out.append(merged.to(dtype=out_dtype[m]))
        return out

    # ------------------------------------------------------------------ after the merge
    def card_sections(self, notes: Sequence[tuple[str, Notes]], params: LegoParams) -> list[tuple[str, str]]:
        records = [n["record"] for _, n in notes]
        return [fidelity_section(records, params.reweight)] if records else []

    def artifacts(self, notes: Sequence[tuple[str, Notes]], params: LegoParams,
                  labels: Sequence[str]) -> dict[str, str]:
        if not notes or not params.report:
            return {}
        meta = {"k": params.k if params.k is not None else f"ratio {params.k_ratio}", "reweight": params.reweight,
                "space": params.space, "backend": params.backend, "signs": params.signs}
        return report_files([n["record"] for _, n in notes], list(labels), meta)


def _detail(rec: ModuleRecord, source: torch.Tensor, labels: torch.Tensor, cos: torch.Tensor, k: int) -> None:
    """Fill the ``--report`` details of one module: cluster sizes, input × cluster counts, cosine spread."""
    onehot = torch.nn.functional.one_hot(labels.cpu(), k)
    rec.sizes = onehot.sum(0).tolist()
    for i in source.unique().tolist():
        rec.input_by_cluster[i] = onehot[source == i].sum(0).tolist()
    for j in range(k):
        cj = cos[labels.cpu() == j]
        rec.cos_mean.append(float(cj.mean()) if len(cj) else 1.0)
        rec.cos_min.append(float(cj.min()) if len(cj) else 1.0)
