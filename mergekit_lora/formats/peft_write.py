"""Write rank units as a PEFT LoRA adapter that ``PeftModel.from_pretrained`` loads unchanged."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import AdapterMeta
from ..arrays import Stored, dtype_name, torch_dtype
from ..factor_arrays import ArrayUnits
from .peft_layout import PEFT_PREFIX
from .safetensors_stream import SafetensorsStream, header_budget

if TYPE_CHECKING:
    from ..units import RankUnits

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def peft_tensors(name: str, u: RankUnits | ArrayUnits, dtype: Any, prefix: str = PEFT_PREFIX) -> dict[str, Any]:
    """The PEFT keys and tensors of one module (scale already folded into B: the file's scale is 1).

    ``dtype``: a name (``"bfloat16"``) or a torch dtype.  Torch tensors for :class:`RankUnits`, numpy
    :class:`~mergekit_lora.arrays.Stored` arrays (the same bytes) for :class:`ArrayUnits`."""
    base = f"{prefix}{name}"
    if isinstance(u, ArrayUnits):
        A, B = u.stored(dtype_name(dtype))  # rank 0 -> one zero unit, as below
        rank = A.shape[0]
        if u.kind == "conv":
            A = Stored(A.data.reshape(rank, *u.weight_shape[1:]), A.dtype)
            B = Stored(B.data.reshape(u.d_out, rank, *([1] * len(u.weight_shape[2:]))), B.dtype)
    else:
        import torch  # a RankUnits' tensors: torch is already imported

        if u.rank == 0:  # PEFT cannot hold rank 0: one zero unit keeps the module and ΔW = 0
            u = u.with_factors(torch.zeros(1, u.d_in, dtype=u.A.dtype), torch.zeros(u.d_out, 1, dtype=u.B.dtype))
        dt = torch_dtype(dtype)
        A = u.A.detach().to("cpu", dt).contiguous()
        B = u.B.detach().to("cpu", dt).contiguous()
        if u.kind == "conv":
            A = A.reshape(u.rank, *u.weight_shape[1:]).contiguous()
            B = B.reshape(u.d_out, u.rank, *([1] * len(u.weight_shape[2:]))).contiguous()
    if u.kind == "embedding":
        return {f"{base}.lora_embedding_A": A, f"{base}.lora_embedding_B": B}
    return {f"{base}.lora_A.weight": A, f"{base}.lora_B.weight": B}


def peft_config(ranks: dict[str, int], meta: AdapterMeta, *,
                target_modules: Sequence[str] | str | None = None) -> dict[str, Any]:
    """A LoRA config whose scale is exactly 1 for every module: r = lora_alpha = rank.

    Modules whose rank differs from the most common one get ``rank_pattern``/``alpha_pattern`` entries
    keyed by their full name.  ``use_rslora`` is never inherited: with the scale folded in it would
    rescale by √r (the PEFT identity-merge bug #3761).
    """
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    names = list(ranks)
    odd = {n: r for n, r in ranks.items() if r != common}
    pattern = {_pattern_key(n, names): r for n, r in odd.items()}
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "base_model_name_or_path": meta.base_model,
        "revision": meta.revision,
        "task_type": meta.task_type,
        "r": int(common),
        "lora_alpha": int(common),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "target_modules": _target_modules(names, target_modules),
        "fan_in_fan_out": bool(meta.fan_in_fan_out),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return cfg


def _pattern_key(name: str, names: list[str]) -> str:
    """The module's own name, anchored only when another module's name ends with ``.name``."""
    if any(o != name and o.endswith("." + name) for o in names):
        return "^" + re.escape(name)
    return name


def _target_modules(names: list[str], given: Sequence[str] | str | None) -> list[str] | str:
    """The carried target_modules when given, else every module's full name (always exact)."""
    if given is not None:
        return given if isinstance(given, str) else sorted(set(given))
    return sorted(names)


def carried_target_modules(metas: Sequence[AdapterMeta], input_modules: Sequence[Iterable[str]],
                           output_modules: Iterable[str]) -> list[str] | None:
    """The inputs' own ``target_modules`` when they describe exactly the output's modules, else None.

    A list like ["q_proj", "v_proj"] selects every matching module of the base model; that equals the
    output's module set only if the output holds the union of the inputs' modules and no input
    restricted layers.  Otherwise the writer lists full module names, which is always exact.
    """
    union: set[str] = set()
    for mods in input_modules:
        union |= set(mods)
    if set(output_modules) != union:
        return None
    targets: set[str] = set()
    for m in metas:
        tm = m.target_modules
        if not isinstance(tm, list) or m.config.get("layers_to_transform") is not None:
            return None
        targets |= set(tm)
    return sorted(targets)


def write_peft(out_dir: Path, modules: Iterable[tuple[str, RankUnits | ArrayUnits]], meta: AdapterMeta, *,
               dtype: Any = None, target_modules: Sequence[str] | str | None = None,
               metadata: dict[str, str] | None = None, expected_modules: Sequence[str] | None = None,
               profile: str | None = None, rank: int | None = None) -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir`` (an existing folder,
    normally the temp folder of :func:`mergekit_lora.atomic.atomic_output`).  Returns the config.

    ``expected_modules`` (the names ``modules`` will yield) lets the tensors stream straight into the
    file behind a reserved header instead of through a temp file.

    ``profile="portable"``: every module padded with zero units to one rank (``rank``, default the largest),
    ``lora_alpha = r``, explicit short ``target_modules``, none of ``portable.REFUSED_KEYS`` — what vLLM,
    SGLang and LoRAX load.  The returned dict then also holds ``"mergekit_lora.portable"`` (rank and the
    parameters the padding added); that entry is not written to the file."""
    from .portable import check_profile, padded, portable_config

    out_dir = Path(out_dir)
    dtype = dtype or meta.dtype
    ranks: dict[str, int] = {}
    md = {"format": "pt", **(metadata or {})}
    portable = None
    if check_profile(profile) == "portable":
        modules, prank, added = padded(modules, rank)
        portable = {"rank": prank, "padding_params": added}
        md["mergekit_lora.profile"] = "portable"
    budget = None
    if expected_modules is not None:  # the longest key form a module can take (embedding keys)
        budget = header_budget([f"{PEFT_PREFIX}{n}.lora_embedding_{ab}" for n in expected_modules for ab in "AB"], md)
    # streamed: each module's tensors go to disk as they arrive, so memory does not grow with the output
    with SafetensorsStream(out_dir / WEIGHTS_NAME, metadata=md, header_budget=budget) as st:
        for name, u in modules:
            for key, t in peft_tensors(name, u, dtype).items():
                st.add(key, t)
            ranks[name] = max(u.rank, 1)
    cfg = peft_config(ranks, meta, target_modules=target_modules)
    if portable is not None:
        cfg = portable_config(cfg, portable["rank"], ranks)
    (out_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg if portable is None else {**cfg, "mergekit_lora.portable": portable}
