"""diffusers / PEFT-in-diffusers LoRA files, and the older key styles ComfyUI still accepts.

Module names are diffusers paths with their pipeline component: ``unet.down_blocks.0.…``,
``text_encoder.text_model.…``, ``transformer.…``.  Accepted key styles for a module ``M``:
``M.lora_A.weight`` / ``M.lora_B.weight`` (also ``M.lora_A.<adapter>.weight``), ``M.lora.down/up.weight``,
``M.lora_linear_layer.down/up.weight``, attention-processor style ``…processor.to_q_lora.down/up.weight``,
and an optional ``M.alpha``.  Written files use ``lora_A``/``lora_B`` keys with scale 1 and a
``lora_adapter_metadata`` header (r = lora_alpha per module) that diffusers reads on load.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import Adapter
from ..errors import LoraMergeError
from ..names import pattern_value
from .peft_write import peft_config
from .request import WriteRequest
from .sd_common import Entry, Parsed, adapter_from_entries, factors
from .sd_detect import COMPONENTS, UNET_ROOTS, refuse_unknown, refuse_variants
from .sd_meta import canonical_bytes
from .tensors import TensorSource

if TYPE_CHECKING:
    pass

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

_STYLES = [
    re.compile(r"^(?P<mod>.+)\.lora_(?P<half>A|B)(?:\.[\w-]+)?\.weight$"),
    re.compile(r"^(?P<mod>.+)\.lora_linear_layer\.(?P<half>down|up)\.weight$"),
    re.compile(r"^(?P<mod>.+)\.lora\.(?P<half>down|up)\.weight$"),
    re.compile(r"^(?P<mod>.+)_lora\.(?P<half>down|up)\.weight$"),
]
_ALPHA = re.compile(r"^(?P<mod>.+?)(?:_lora|\.lora|\.lora_linear_layer)?\.alpha$")
# attention-processor names -> module names (UNet attention, CLIP self-attention)
_PROC_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROC_TE = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def module_path(raw: str) -> str | None:
    """A diffusers module path with its component (``unet.…``), or None when ``raw`` is not SD-shaped."""
    first = raw.split(".", 1)[0]
    if first not in COMPONENTS:
        if first not in UNET_ROOTS:
            return None
        raw = "unet." + raw  # unet.save_attn_procs() files carry no component prefix
        first = "unet"
    m = re.match(r"^(?P<head>.+)\.processor\.(?P<proc>to_q|to_k|to_v|to_out)$", raw)
    if m:
        table = _PROC_UNET if first == "unet" else _PROC_TE
        return f"{m.group('head')}.{table[m.group('proc')]}"
    if ".processor." in raw:
        return None
    return raw


def parse_diffusers(keys: Iterable[str]) -> Parsed:
    """Pure: diffusers-style keys -> module path -> (down, up, alpha) keys, plus the keys not consumed."""
    entries: dict[str, Entry] = {}
    unconsumed: list[str] = []
    alphas: list[str] = []
    for k in keys:
        for pat in _STYLES:
            m = pat.match(k)
            if m:
                break
        if m is None:
            (alphas if k.endswith(".alpha") else unconsumed).append(k)
            continue
        mod = module_path(m.group("mod"))
        if mod is None:
            unconsumed.append(k)
            continue
        e = entries.setdefault(mod, Entry())
        if m.group("half") in ("A", "down"):
            if e.down is not None:
                raise LoraMergeError(f"module {mod} has two down/lora_A weights ({e.down}, {k}); keep one key style")
            e.down = k
        else:
            if e.up is not None:
                raise LoraMergeError(f"module {mod} has two up/lora_B weights ({e.up}, {k}); keep one key style")
            e.up = k
    for k in alphas:
        m = _ALPHA.match(k)
        mod = module_path(m.group("mod")) if m else None
        if mod in entries:
            entries[mod].alpha = k
        else:
            unconsumed.append(k)
    return Parsed(entries, unconsumed)


def is_diffusers(keys: Sequence[str]) -> bool:
    return bool(parse_diffusers(keys).entries)


def read_diffusers(path: Path, *, allow_pickle: bool = False, strict: bool = True, **_: Any) -> Adapter:
    src = TensorSource.open(Path(path), allow_pickle=allow_pickle)
    refuse_variants(src.path, src.keys)
    parsed = parse_diffusers(src.keys)
    if strict:
        refuse_unknown(src.path, parsed.unconsumed, "diffusers")
    a = adapter_from_entries(src, parsed, fmt="diffusers", naming="diffusers", label=src.path.stem)
    _check_metadata_alphas(a, src.metadata)
    return a


def _check_metadata_alphas(a: Adapter, metadata: Mapping[str, str]) -> None:
    """Honour ``lora_adapter_metadata`` (diffusers' saved LoraConfig per component) when present."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraMergeError(f"{a.path}: header entry {METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoraMergeError(f"{a.path}: header entry {METADATA_KEY} is not a JSON object")
    for name, info in list(a.modules.items()):
        comp, _, path = name.partition(".")
        alpha = cfg.get(f"{comp}.lora_alpha")
        if alpha is None:
            continue
        try:
            alpha = float(pattern_value(cfg.get(f"{comp}.alpha_pattern") or {}, path, alpha))
            if not math.isfinite(alpha):
                raise ValueError("not finite")
        except (TypeError, ValueError, AttributeError, re.error) as e:
            raise LoraMergeError(f"{a.path}: header entry {METADATA_KEY}: {comp}.lora_alpha/alpha_pattern must be "
                                 f"finite numbers keyed by valid regexes ({e})") from None
        rslora = bool(cfg.get(f"{comp}.use_rslora", False))
        scale = alpha / (info.rank ** 0.5 if rslora else info.rank)
        a.modules[name] = replace(info, alpha=alpha, scale=scale)
    a.meta.extra["alpha_assumed"] = False


def write_diffusers(req: WriteRequest) -> dict[str, Any]:
    """Write ``pytorch_lora_weights.safetensors`` (lora_A/lora_B keys, scale 1) + ``lora_adapter_metadata``
    into ``req.out_dir``; returns the packed PEFT configs."""
    dtype = req.dtype
    tensors: dict[str, Any] = {}  # torch tensors or numpy Stored arrays (sd_common.factors)
    ranks: dict[str, dict[str, int]] = {}
    for name, u in req.modules:
        comp, _, path = name.partition(".")
        if comp not in COMPONENTS or not path:
            raise LoraMergeError(
                f"module {name} has no diffusers path (kohya names cannot be mapped back to diffusers paths "
                "without the model); write it with «output_format» kohya, which diffusers' load_lora_weights also reads"
            )
        down, up = factors(u, dtype)
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
        ranks.setdefault(comp, {})[path] = int(down.shape[0])
    meta = req.adapters[0].meta
    packed: dict[str, Any] = {}
    for comp, rk in ranks.items():
        cfg = peft_config(rk, meta)
        keep = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "use_dora",
                "lora_dropout", "bias")
        packed.update({f"{comp}.{k}": cfg[k] for k in keep})
    md = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
          "mergekit_lora.recipe": json.dumps({"method": req.method, **dict(req.recipe or {})}, sort_keys=True, default=str)}
    (Path(req.out_dir) / WEIGHTS_NAME).write_bytes(canonical_bytes(tensors, md))
    return packed
