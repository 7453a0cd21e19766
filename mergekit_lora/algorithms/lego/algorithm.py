"""``lego``: LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO", ICLR 2025, arXiv 2409.16167)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mergekit_lora.adapter import Adapter
from mergekit_lora.fidelity import ModuleFidelity
from mergekit_lora.kmeans import kmeans_gram, resolve_backend
from mergekit_lora.registry import Algorithm, MergedModule, ModuleContext, Notes
from mergekit_lora.units import RankUnits, canonical_factors

from ..catalog import LEGO
from .params import LegoParams
from .pool import PoolBatch, Workspace, build_pools, pooled_dtype
from .read import PoolBuffers, read_pools
from .report import ModuleRecord, fidelity_section, report_files
from .report_plot import report_png
from .reweight import ClusterStats, centroids, cluster_stats, option_scales


class Lego(Algorithm[LegoParams], entry=LEGO):
    """Rank-wise k-means over the pooled rank units of all inputs; cluster centroids become the units.

    Per module: every rank unit (MSU) of every input is one vector; k-means (k-means++ seeds from the
    module's seeded generator, ``n_init`` restarts, Lloyd, deterministic empty-cluster re-seeding) groups
    them into k clusters; each cluster's mean is one unit b̄_j ā_jᵀ of the merged rank-k module; then
    ``reweight`` (``reweight.py``) scales the units.

    ``features="paper"`` is the published method (both public implementations agree): k-means on
    [a_i/‖a_i‖ ; b_i/‖b_i‖], centroids the mean of the members' raw [a_i ; b_i], ``reweight="paper"``: each
    centroid vector × mean_i ‖u_i‖_∞ / ‖centroid‖_∞, the merged ΔW × √(r/k).  ``features="canonical"``
    clusters and averages balanced units (‖a‖ = ‖b‖) instead, with sign-invariant k-means by default; it is
    the default (the best measured variant on a validation slice, README).

    Weights: LoRA-LEGO has none (every unit counts once).  Here weights are *relative*: input t's units
    enter the pool as ω_t b_i a_iᵀ with ω_t = n·w_t / Σ_s |w_s|, so equal weights of any size (1, or the
    1/n of an average) give exactly the published unweighted merge, and unequal weights tilt the cluster
    means; the weights never shrink the update on top of the cluster averaging.  The reference the merge
    is measured against (fidelity rows, the card) and that ``lsq`` fits is the weighted average
    T = Σ_t w_t ΔW_t / Σ_t |w_t|.  When an input lacks a module, the weights are normalised over the inputs
    that have it.

    Choices the paper leaves open, all parameters: the sign handling, the pool order (sorted by content, so
    results do not depend on input order), empty clusters (re-seeded with the farthest point; when fewer
    distinct units than k exist they stay empty and become zero units).  k ≥ pooled rank makes every unit
    its own cluster (the formulas still apply).  Same-shape modules are clustered as one batch, and
    everything but the centroids is computed from the pool's N×N Gram matrices.
    """

    def batch_limit(self, params: LegoParams) -> int:
        return params.batch_modules

    def load_batch(self, inputs: list[list[tuple[Adapter, int]]], params: LegoParams,
                   ctxs: list[ModuleContext], weights: list[list[float]] | None = None) -> list[list[RankUnits]]:
        """The inputs read straight into a batch pool (:func:`read_pools`) on the CPU, else as usual.  With the
        weights, the pool's pass over the inputs (weighting, sort keys, max-abs norms, signs) is made while
        reading too: on the read-ahead thread when there is one, not on the merging one."""
        if ctxs[0].device.type == "cpu":
            keys = {} if weights is None else {"weights": weights, "signs": params.sign_mode,
                                               "generators": [c.generator("lego-order") for c in ctxs]}
            got = read_pools(inputs, [c.name for c in ctxs], self._buffers(), ctxs[0].threads, **keys)
            if got is not None:
                return got
        return super().load_batch(inputs, params, ctxs, weights)

    def _workspace(self) -> Workspace:
        return self.__dict__.setdefault("_pool_buffer", Workspace())  # the pool of copied inputs, per thread

    def _buffers(self) -> PoolBuffers:
        return self.__dict__.setdefault("_read_buffers", PoolBuffers())  # the pools read_pools reads into

    def merge_module(self, units: list[RankUnits], weights: list[float], params: LegoParams,
                     ctx: ModuleContext) -> MergedModule:
        return self.merge_batch([units], [weights], params, [ctx])[0]

    def merge_batch(self, units: list[list[RankUnits]], weights: list[list[float]], params: LegoParams,
                    ctxs: list[ModuleContext]) -> list[MergedModule]:
        try:
            with self._buffers().merges.hold():  # a batch read meanwhile may take the B-Grams (read_pools)
                return self._merge(units, weights, params, ctxs)
        finally:  # the pool load_batch read this batch into, if any, is free for the next read
            self._buffers().give(units[0][0].A)

    def _merge(self, units: list[list[RankUnits]], weights: list[list[float]], params: LegoParams,
               ctxs: list[ModuleContext]) -> list[MergedModule]:
        device = ctxs[0].device
        if len({sum(u.rank for u in us) for us in units}) != 1:  # the driver batches same shapes only
            return [r for i in range(len(units)) for r in self._merge([units[i]], [weights[i]], params, [ctxs[i]])]
        pool = build_pools(units, weights, features=params.features, signs=params.sign_mode,
                           generators=[c.generator("lego-order") for c in ctxs], device=device,
                           workspace=self._workspace(), threads=ctxs[0].threads, buffers=self._buffers())
        out_dtype = [pooled_dtype(us) for us in units]
        n = pool.size
        k = params.k_for(n, max(u.rank for u in units[0]))
        if k >= n:  # every unit its own cluster (the formulas still apply: ρ = 1, output × √(r/k))
            labels = torch.arange(n).expand(len(units), n)
            signs = torch.ones(len(units), n, dtype=torch.float64)
        else:
            res = kmeans_gram(pool.K(params.space), k, generators=[c.generator("lego-kmeans") for c in ctxs],
                              backend=resolve_backend(params.backend, device), n_init=params.n_init,
                              max_iter=params.max_iter, device=device, sign_invariant=params.sign_mode == "invariant")
            labels, signs = res.labels, res.signs_or_ones()
        kk = min(k, n)
        stats = [cluster_stats(pool.KA[m], pool.KB[m], labels[m], signs[m], kk, pool.linf[m], pool.target_scale[m],
                               pool.source[m] if params.balance_inputs else None) for m in range(len(units))]
        A_c, B_c, c_linf = centroids(pool, stats, ctxs[0].threads)
        scales, rows, records = [], [], []
        for m, (st, ctx) in enumerate(zip(stats, ctxs)):
            t2 = float(pool.target_norm2[m])
            opts, err2 = option_scales(st, c_linf[m], pool.mean_rank[m], t2)
            s = opts[params.reweight]
            scales.append(s)
            m2 = float(s @ st.G @ s)
            rows.append(ModuleFidelity(ctx.name, t2**0.5, max(m2, 0.0) ** 0.5, err2[params.reweight] ** 0.5))
            rec = ModuleRecord(ctx.name, n, kk, k >= n, t2, err2, st.sizes.tolist())
            if params.report:
                _detail(rec, pool.source[m], labels[m], st.cos, kk)
            records.append(rec)
        B_c.mul_(torch.stack(scales).to(B_c)[:, None, :])
        merged = self._assemble(pool, stats, A_c, B_c, out_dtype)
        return [MergedModule(u, fidelity=row, notes={"record": rec}) for u, row, rec in zip(merged, rows, records)]

    def _assemble(self, pool: PoolBatch, stats: list[ClusterStats], A_out: torch.Tensor, B_out: torch.Tensor,
                  out_dtype: list[torch.dtype]) -> list[RankUnits]:
        """Wrap the batch's merged factors ā [M, k, d_in], s·b̄ [M, d_out, k] as canonical units (sources: the
        input of a cluster whose members all come from one input, else -1)."""
        A_out, B_out = canonical_factors(A_out, B_out)
        member = torch.stack([st.W for st in stats]).cpu() != 0  # [M, N, k]
        shifted = pool.source + 1  # source -1 (a unit of no single input) is a value of its own
        onehot = torch.nn.functional.one_hot(shifted, int(shifted.max()) + 1).to(torch.float32)  # [M, N, T]
        present = torch.bmm(onehot.transpose(1, 2), member.to(torch.float32)) > 0  # [M, T, k] input t in cluster j
        src = torch.where(present.sum(1) == 1, present.to(torch.int64).argmax(1) - 1, -1)  # [M, k]
        return [pool.template[m].with_factors(A_out[m], B_out[m], src[m]).to(dtype=out_dtype[m])
                for m in range(len(stats))]

    # ------------------------------------------------------------------ after the merge
    def report(self, notes: Sequence[tuple[str, Notes]], params: LegoParams) -> dict[str, Any]:
        """Says when k ≥ the pooled rank left modules unclustered (the merge is then the plain weighted pool)."""
        kept = [n["record"] for _, n in notes if n["record"].exact]
        if not kept:
            return {}
        pools = sorted({r.pool for r in kept})
        pooled = str(pools[0]) if len(pools) == 1 else f"{pools[0]}–{pools[-1]}"
        scope = "every module" if len(kept) == len(notes) else f"{len(kept)} of {len(notes)} modules"
        k = params.k if params.k is not None else kept[0].k
        return {"warning": f"k = {k} ≥ the pooled rank ({pooled}) of {scope}: modules not clustered, "
                           f"the result there is the concatenation of the weighted inputs (what `merge -m cat` "
                           f"writes); choose -k below {pools[0]} to compress"}

    def card_sections(self, notes: Sequence[tuple[str, Notes]], params: LegoParams) -> list[tuple[str, str]]:
        records = [n["record"] for _, n in notes]
        return [fidelity_section(records, params.reweight)] if records else []

    def artifacts(self, notes: Sequence[tuple[str, Notes]], params: LegoParams,
                  labels: Sequence[str]) -> dict[str, str | bytes]:
        if not notes or not params.report:
            return {}
        k = params.k if params.k is not None else (f"ratio {params.k_ratio}" if params.k_ratio else "input rank")
        meta = {"k": k, "reweight": params.reweight,
                "features": params.features, "space": params.space, "backend": params.backend,
                "signs": params.sign_mode, "balance_inputs": params.balance_inputs}
        records = [n["record"] for _, n in notes]
        return {**report_files(records, list(labels), meta), "lego_report.png": report_png(records, labels)}


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
