"""Stable Diffusion LoRA detection: which key family, which unsupported variant, which base family.

Everything here is pure: it looks at key names, shapes and header metadata, never at tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import LoraMergeError

# kohya / A1111 module names: one token with ``_`` for every ``.`` of the module path.
KOHYA_KEY = re.compile(
    r"^(?P<mod>(?:lora_unet|lora_te\d?|lora_transformer|lycoris)_[^.]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
KOHYA_PREFIX = re.compile(r"^(?:lora_unet|lora_te\d?|lora_transformer|lycoris)_")

# Weight-decomposed or non-LoRA variants: (label, how to recognise a key, what to do about it).
VARIANTS: list[tuple[str, re.Pattern[str]]] = [
    ("LoCon/Tucker (lora_mid)", re.compile(r"\.lora_mid\.weight$")),
    ("DoRA (dora_scale)", re.compile(r"(^|\.)dora_scale$")),
    ("LoHa (hada_*)", re.compile(r"(^|\.)hada_")),
    ("LoKr (lokr_*)", re.compile(r"(^|\.)lokr_")),
]

# Base families, as named in AdapterMeta.extra["base_family"].
_SS_VERSION = [("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("flux", "flux"), ("sd3", "sd3")]
_ARCH = [("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v1", "sd1"), ("stable-diffusion-v2", "sd2"),
         ("flux", "flux"), ("stable-diffusion-3", "sd3")]
# Cross-attention context width (attn2.to_k input) per family: CLIP-L 768, OpenCLIP-H 1024, CLIP-L+G 2048.
_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def is_kohya(keys: Sequence[str]) -> bool:
    return any(KOHYA_PREFIX.match(k) for k in keys)


def refuse_variants(path: Path, keys: Sequence[str]) -> None:
    """Refuse LyCORIS / DoRA variants by name and count: they are not sums of rank units."""
    found = []
    for label, pat in VARIANTS:
        hits = [k for k in keys if pat.search(k)]
        if hits:
            found.append(f"{label}: {len(hits)} keys, e.g. {hits[0]}")
    if found:
        raise LoraMergeError(
            f"{path}: holds weights of a LoRA variant that is not a sum of rank units ({'; '.join(found)}); "
            "only plain LoRA (lora_down/lora_up/alpha) can be merged — convert or extract it to a plain LoRA first"
        )


def refuse_unknown(path: Path, unknown: Sequence[str], family: str) -> None:
    """List the keys a converter did not consume (the issue diffusers #9291: never drop keys silently)."""
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" … (+{len(unknown) - 10} more)" if len(unknown) > 10 else "")
        raise LoraMergeError(
            f"{path}: {len(unknown)} keys are not {family} LoRA weights and would be dropped: {shown}; "
            "nothing was read — remove them or run `loramerge inspect` to see the file"
        )


def base_family(names: Sequence[str], shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str:
    """sd1 / sd2 / sdxl / flux / sd3 / unknown: from metadata first, then key patterns, then shapes.

    ``names`` are module names (kohya or diffusers); ``shapes`` maps module name -> (d_out, d_in).
    """
    ver = str(metadata.get("ss_base_model_version", "")).lower()
    for prefix, fam in _SS_VERSION:
        if ver.startswith(prefix):
            return fam
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    for prefix, fam in _ARCH:
        if arch.startswith(prefix):
            return fam
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    joined = names
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in joined):
        return "sdxl"
    if any(re.search(r"(double_blocks|single_blocks|single_transformer_blocks)", n) for n in joined):
        return "flux"
    if any(re.match(r"lora_unet_(input_blocks|output_blocks|middle_block)", n) for n in joined):
        return "sdxl"  # sd-scripts uses the SGM UNet naming only for SDXL
    for n in joined:
        if re.search(r"attn2[._]to_k$", n) and n in shapes:
            fam = _CONTEXT_DIM.get(shapes[n][1])
            if fam:
                return fam
    return "unknown"


# ---------------------------------------------------------------- diffusers -> kohya names
UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding",
               "add_embedding", "conv_norm_out", "encoder_hid_proj", "class_embedding")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")


def kohya_name(module: str, *, sdxl: bool) -> str:
    """The kohya name of a diffusers module path (deterministic in this direction).

    ``unet.a.b`` -> ``lora_unet_a_b``; ``text_encoder.x`` -> ``lora_te_x`` (``lora_te1_x`` for SDXL);
    ``text_encoder_2.x`` -> ``lora_te2_x``.  Transformer (FLUX / SD3) LoRAs use other original
    names in kohya files, so they are refused rather than guessed.
    """
    comp, _, path = module.partition(".")
    flat = path.replace(".", "_")
    if comp == "unet":
        return f"lora_unet_{flat}"
    if comp == "text_encoder":
        return f"lora_te1_{flat}" if sdxl else f"lora_te_{flat}"
    if comp == "text_encoder_2":
        return f"lora_te2_{flat}"
    if comp == "text_encoder_3":
        return f"lora_te3_{flat}"
    raise LoraMergeError(
        f"module {module}: {comp} LoRAs have no deterministic kohya name (kohya uses the original model's "
        "module names for FLUX/SD3); write them with «output_format» diffusers instead"
    )


def sgm_style(names: Sequence[str]) -> list[str]:
    """kohya names that use the original (SGM/BFL) block names instead of diffusers' paths."""
    return [n for n in names if re.match(r"lora_unet_(input_blocks|output_blocks|middle_block|double_blocks|"
                                         r"single_blocks|final_layer|img_|txt_)", n)]
