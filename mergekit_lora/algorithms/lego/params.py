"""LoRA-LEGO parameters: one frozen pydantic model for CLI flags, ``-p key=value`` and recipes."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from mergekit_lora.registry import AlgorithmParams

Features = Literal["paper", "canonical", "raw"]
Signs = Literal["invariant", "rule", "none"]
# the sign handling each feature form gets unless ``signs`` is given
DEFAULT_SIGNS: dict[str, str] = {"paper": "none", "canonical": "invariant", "raw": "none"}


class LegoParams(AlgorithmParams):
    k: int | None = Field(None, ge=1, description="clusters per module = rank of the merged module "
                                                  "(default: the inputs' largest rank, k = r as in the paper)")
    k_ratio: float | None = Field(None, gt=0, le=1, description="k as a fraction of the pooled rank (ceil)")
    features: Features = Field(
        "canonical", description="what k-means clusters and centroids average: paper = features [a/‖a‖; b/‖b‖], "
                             "centroids of the raw units [a; b] (the published method); canonical = balanced "
                             "units (‖a‖ = ‖b‖) for both; raw = raw [a; b] for both (ablation only)")
    space: Literal["concat", "a", "b"] = Field(
        "concat", description="cluster on the whole feature vector (paper), or its A-part / B-part only")
    backend: Literal["auto", "torch", "faiss", "sklearn"] = Field(
        "auto", description="k-means backend (auto = torch: batched, CUDA when the device is CUDA)")
    reweight: Literal["paper", "lsq", "none"] = Field(
        "paper", description="paper: dual reweighting (L∞ parameter rescale, output × √(r/k)); "
                             "lsq: exact least-squares unit scales against the weighted average; none")
    balance_inputs: bool = Field(
        False, description="cluster means weight every input present in a cluster equally (not every unit)")
    n_init: int = Field(3, ge=1, description="k-means restarts (lowest inertia wins)")
    max_iter: int = Field(100, ge=1, description="Lloyd iterations at most")
    signs: Signs | None = Field(
        None, description="invariant: k-means treats v and -v as the same unit; rule: fix each unit's sign "
                          "first (largest |a| entry positive); none: units as stored (the published method); "
                          "default: none for features paper/raw, invariant for canonical")
    report: bool = Field(False, description="write lego_report.json/.md (cluster sizes, input×cluster, spread)")
    batch_modules: int = Field(8, ge=1, description="same-shape modules clustered together (bounds memory)")

    @model_validator(mode="after")
    def _one_k(self) -> LegoParams:
        if self.k is not None and self.k_ratio is not None:
            raise ValueError("give k (e.g. 16) or k_ratio (e.g. 0.5), not both")
        return self

    @property
    def sign_mode(self) -> str:
        """``signs``, or the default of the feature form."""
        return self.signs if self.signs is not None else DEFAULT_SIGNS[self.features]

    def k_for(self, pool_size: int, input_rank: int) -> int:
        """This module's k: ``k``, or ceil(k_ratio × pooled rank), or the inputs' largest rank; at least 1."""
        if self.k is not None:
            return self.k
        if self.k_ratio is not None:
            return max(1, math.ceil(self.k_ratio * pool_size - 1e-9))
        return max(1, input_rank)
