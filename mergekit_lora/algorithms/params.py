"""The built-in algorithms' parameters: frozen pydantic models, importable without torch.

They are the single source of CLI ``-p`` keys, YAML keys, ``loramerge methods`` rows and search spaces;
the implementations (``linear.py``, ``dense.py``, …) import them from here.  LoRA-LEGO's live in
``lego/params.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from mergekit_lora.registry import AlgorithmParams

SignMethod = Literal["total", "frequency"]
SignFrom = Literal["weighted", "unweighted"]


class LinearParams(AlgorithmParams):
    rank: int | None = Field(None, ge=1, description="re-rank the sum to this rank with the exact factor-space SVD")


class SvdParams(AlgorithmParams):
    rank: int | None = Field(None, ge=1, description="output rank k (default: the largest input rank)")


class DenseParams(AlgorithmParams):
    """Refactorisation knobs shared by every dense-then-refactor method."""

    density: float = Field(0.5, gt=0, le=1, description="fraction of each input's entries kept, in (0, 1]: of "
                                                        "its m×n ΔW (space=full) or of its R×R core matrix (core)")
    rank: int | None = Field(None, ge=1, description="output rank k (default: the largest input rank; space=core: "
                                                     "R = Σ rᵢ, lossless)")
    space: Literal["full", "core"] = Field(
        "full", description="full: on each dense ΔW, refactored; core: on the R×R core matrices in the singular-vector "
                            "bases of the stacked B's and A's (Core Space merging; exact, no m×n matrix)")
    exact_svd: bool = Field(False, description="always refactor with the exact dense SVD (default: exact "
                                               "for small matrices, else the subspace iteration)")
    oversample: int = Field(8, ge=0, description="subspace iteration: Gaussian columns added to the inputs' B columns")
    niter: int | None = Field(None, ge=0, description="subspace iteration: power iterations (default: per module, "
                                                       "until its spectrum bounds the error under ~5e-4, 1–6)")


class SignParams(DenseParams):
    """TIES-style parameters: sign election and the λ scale (``lambda`` in YAML/``-p``, ``--lambda`` on the CLI)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    majority_sign: SignMethod = Field("total", description="elect each entry's sign by total mass or by frequency")
    sign_from: SignFrom = Field(
        "weighted", description="elect the sign on the weighted trimmed tensors wᵢ·xᵢ, or on the unweighted xᵢ "
                                "as PEFT's ties/dare_ties (then the disjoint mean of the wᵢ·xᵢ whose xᵢ agree "
                                "with it: PEFT's dense result for any weights)")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged update")

    @model_serializer(mode="wrap")
    def _quiet_default(self, handler: SerializerFunctionWrapHandler) -> Any:
        """``sign_from`` came after outputs were published: at its default it stays out of every record
        (card, the adapter config's recipe), so default merges keep their bytes."""
        d = handler(self)
        if isinstance(d, dict) and self.sign_from == "weighted":
            d.pop("sign_from", None)
        return d


class TiesParams(SignParams):
    pass


class DareLinearParams(DenseParams):
    pass


class DareTiesParams(SignParams):
    pass


class MagnitudePruneParams(DenseParams):
    pass


class KnotsTiesParams(AlgorithmParams):
    density: float = Field(0.2, gt=0, le=1, description="fraction of each task's k×n entries of diag(s)·Vₜᵀ kept "
                                                        "(per module; chosen on the suite's selection scenarios, "
                                                        "0.2 over 1.0); 1 = sign election + disjoint mean only, "
                                                        "as the reference's Llama config")
    majority_sign: SignMethod = Field("total", description="elect each entry's sign by total mass or by frequency")
    rank: int | None = Field(None, ge=1, description="output rank (default: k, the rank of [ΔW₁ … ΔW_T], ≤ Σ rᵢ)")


class KnotsDareTiesParams(AlgorithmParams):
    density: float = Field(0.2, gt=0, le=1, description="DARE keep probability on each task's diag(s)·Vₜᵀ "
                                                        "(reference Llama config: drop 0.8)")
    majority_sign: SignMethod = Field("total", description="elect each entry's sign by total mass or by frequency")
    rank: int | None = Field(None, ge=1, description="output rank (default: k, the rank of [ΔW₁ … ΔW_T], ≤ Σ rᵢ)")


class CoreRankParams(AlgorithmParams):
    rank: int | None = Field(None, ge=1, description="output rank (default: R = Σ rᵢ; smaller: exact SVD truncation)")


class TsvParams(CoreRankParams):
    pass


class IsoCParams(AlgorithmParams):
    rank: int | None = Field(None, ge=1, description="output rank (default: R = Σ rᵢ; smaller: the k directions with "
                                                     "the largest singular values before flattening)")


class IsoCtsParams(IsoCParams):
    common_fraction: float = Field(0.8, ge=0, le=1, description="share of the R directions taken from the sum's "
                                                                "common subspace (the rest: task-specific)")


class RouteParams(AlgorithmParams):
    router: Literal["implicit", "gate", "hierarchical"] = Field(
        "implicit", description="implicit (|a·x|·‖b‖, training-free), gate, or hierarchical (sequence -> adapter "
                                "-> unit; needs per-adapter profile data)")
    top_k: int | None = Field(None, ge=1, description="active units per token (capped at a module's unit count R; "
                                                      "default: half the largest input rank, chosen on the suite)")
    top_k_pattern: dict[str, int] = Field(default_factory=dict,
                                          description="per-module top-k: module name suffix or regex -> k")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the gate router's weights "
                                                      "(hierarchical: of the adapter posterior)")
    top_m: int = Field(1, ge=1, description="hierarchical: adapters chosen per sequence")
    mass: float | None = Field(None, gt=0, le=1, description="hierarchical: instead of top_m, the fewest adapters "
                                                             "whose posterior probability reaches this mass")
    evidence: Literal["depth", "module"] = Field("depth", description="hierarchical: sum the sequence evidence over "
                                                                      "all routed modules so far, or per module")
