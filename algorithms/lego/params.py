"""LoRA-LEGO parameters: one frozen pydantic model for CLI flags, ``-p key=value`` and recipes."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from mergekit_lora.registry import AlgorithmParams


class LegoParams(AlgorithmParams):
    k: int | None = Field(None, ge=1, description="clusters per module = rank of the merged module")
    k_ratio: float | None = Field(None, gt=0, le=1, description="k as a fraction of the pooled rank (ceil)")
    space: Literal["concat", "a", "b"] = Field(
        "concat", description="cluster the vectors [b;a] (paper), or the A-part / B-part only")
    backend: Literal["auto", "torch", "faiss", "sklearn"] = Field(
        "auto", description="k-means backend (auto = torch: batched, CUDA when the device is CUDA)")
    reweight: Literal["paper", "lsq", "none"] = Field(
        "paper", description="paper: dual reweighting; lsq: exact least-squares unit scales; none")
    n_init: int = Field(3, ge=1, description="k-means restarts (lowest inertia wins)")
    max_iter: int = Field(100, ge=1, description="Lloyd iterations at most")
    canonical: bool = Field(True, description="canonicalise units before clustering (off only for ablations)")
    signs: Literal["invariant", "rule"] = Field(
        "invariant", description="invariant: k-means treats v and -v as the same unit; rule: fix each unit's "
                                 "sign first (largest |a| entry positive; unstable on near-ties)")
    report: bool = Field(False, description="write lego_report.json/.md (cluster sizes, input×cluster, spread)")
    batch_modules: int = Field(8, ge=1, description="same-shape modules clustered together (bounds memory)")

    @model_validator(mode="after")
    def _one_k(self) -> LegoParams:
        if (self.k is None) == (self.k_ratio is None):
            raise ValueError("give exactly one of k (e.g. 16) or k_ratio (e.g. 0.5)")
        return self

    def k_for(self, pool_size: int) -> int:
        """This module's k: ``k``, or ceil(k_ratio × pooled rank), at least 1."""
        if self.k is not None:
            return self.k
        assert self.k_ratio is not None
        return max(1, math.ceil(self.k_ratio * pool_size - 1e-9))
