"""What the Stable Diffusion formats add to the format registry: name alignment, inspect rows, a PEFT refusal.

Naming across families: kohya names are their own namespace.  When kohya and diffusers inputs are
merged together, the diffusers inputs are renamed to kohya names (``unet.a.b`` -> ``lora_unet_a_b``,
deterministic in that direction) and the merge is written as kohya.  kohya files that use the
original SGM/BFL block names (``lora_unet_input_blocks_…``, FLUX ``double_blocks``) cannot be lined up
with diffusers paths without the model, so that mix is refused with a message saying what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter, AdapterMeta, ModuleInfo
from ..errors import LoraMergeError
from .kohya import to_kohya_names
from .sd_detect import sgm_style
from .sd_meta import file_data_sha256

if TYPE_CHECKING:
    from ..factor_arrays import ArrayUnits
    from ..units import RankUnits

SD_NAMINGS = ("kohya", "diffusers")


def renamed(a: Adapter, names: dict[str, str], fmt: str) -> Adapter:
    """The same adapter under new module names (lazy: loads through the original)."""
    back = {new: old for old, new in names.items()}
    infos = {names[n]: replace(i, name=names[n]) for n, i in a.modules.items()}
    extra = {**a.meta.extra, "naming": fmt, "renamed_from": a.meta.format}
    meta = AdapterMeta(**{**a.meta.__dict__, "format": fmt, "extra": extra})

    def load(info: ModuleInfo) -> RankUnits:
        return a.units(back[info.name])

    def load_arrays(info: ModuleInfo) -> ArrayUnits:
        return a.arrays(back[info.name])

    return Adapter(infos, meta, load, path=a.path, unknown_keys=a.unknown_keys, label=a.label,
                   array_loader=load_arrays if a.has_arrays else None)


def align_sd(adapters: list[Adapter]) -> list[Adapter]:
    """kohya + diffusers inputs -> all kohya names (or a clear refusal); anything else is left alone."""
    namings = {a.meta.extra.get("naming") for a in adapters}
    if not {"kohya", "diffusers"} <= namings:
        return adapters
    kohya = [a for a in adapters if a.meta.extra.get("naming") == "kohya"]
    for a in kohya:
        sgm = sgm_style(a.module_names())
        if sgm:
            other = next(b.label for b in adapters if b.meta.extra.get("naming") == "diffusers")
            raise LoraMergeError(
                f"{a.label} uses the original model's block names ({sgm[0]}, {len(sgm)} modules) and {other} uses "
                "diffusers paths; they cannot be lined up without the model's block map — convert the kohya file "
                "to diffusers with diffusers' own loader (load_lora_weights, then save_lora_weights) and merge "
                "the diffusers files"
            )
    all_names = [n for a in adapters for n in a.module_names()]
    sdxl_names = ("text_encoder_2.", "lora_te1_", "lora_te2_")
    out = []
    for a in adapters:
        if a.meta.extra.get("naming") != "diffusers":
            out.append(a)
            continue
        names = to_kohya_names(a.module_names())
        if any(n.startswith(sdxl_names) for n in all_names):  # SDXL: text_encoder -> lora_te1_
            names = {n: k.replace("lora_te_", "lora_te1_", 1) if k.startswith("lora_te_") else k
                     for n, k in names.items()}
        out.append(renamed(a, names, "kohya"))
    return out


def refuse_mixed_families(adapters: Sequence[Adapter]) -> str | None:
    """A Stable Diffusion LoRA and a transformers LoRA never merge: why, naming one of each."""
    sd = [a.label for a in adapters if a.meta.extra.get("naming") in SD_NAMINGS]
    other = [a.label for a in adapters if a.meta.extra.get("naming") not in SD_NAMINGS]
    if sd and other:
        return (f"the inputs belong to different model families: {other[0]} is a LoRA of a transformers model and "
                f"{sd[0]} a Stable Diffusion LoRA; they cannot be merged — merge adapters of one base model")
    return None


def refuse_peft_output(adapters: Sequence[Adapter]) -> str | None:
    """SD module names written as PEFT keys load nowhere: say so instead of writing a useless file."""
    sd = [a.label for a in adapters if a.meta.extra.get("naming") in SD_NAMINGS]
    if sd:
        return (f"{sd[0]} is a Stable Diffusion LoRA; output format peft would write keys no SD loader reads — "
                "use «output_format» kohya or «output_format» diffusers")
    return None


def inspect_sd(a: Adapter, report: dict[str, Any]) -> None:
    """kohya/diffusers details for ``loramerge inspect`` (printed as one ``sd`` row)."""
    if a.meta.extra.get("naming") not in SD_NAMINGS:
        return
    md = a.meta.extra.get("metadata", {})
    sd: dict[str, Any] = {"key_style": a.meta.extra.get("naming"),
                          "conv_modules": sum(i.kind == "conv" for i in a.modules.values())}
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                "modelspec.title"):
        if key in md:
            sd[key] = md[key]
    if "sshs_model_hash" in md and a.path is not None and a.path.suffix == ".safetensors":
        actual = a.meta.extra.get("data_sha256") or file_data_sha256(a.path)
        sd["sshs_model_hash"] = md["sshs_model_hash"][:12] + ("" if md["sshs_model_hash"] == actual else " (stale)")
    report["sd"] = sd
