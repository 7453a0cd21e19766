"""The layout of a PEFT LoRA adapter from its header and config alone (no tensor read, no torch).

:func:`peft_layout` pairs the ``lora_A``/``lora_B`` keys into modules and gives each its rank, shapes,
kind, alpha and scale, refusing what cannot be merged as rank units (DoRA, LoRA biases, trained biases,
incomplete pairs, ranks that contradict the config) in one sentence naming the file and key.
``peft_read`` turns a layout into an :class:`~mergekit_lora.adapter.Adapter`; ``loramerge inspect``
reads it directly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraMergeError
from ..names import natural_key, pattern_value
from .peft_config import validate_config
from .safetensors_header import SafetensorsHeader

if TYPE_CHECKING:
    from ..units import ModuleKind

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_LINEAR = re.compile(r"^(?P<mod>.+)\.(?P<half>lora_A|lora_B)(?:\.(?P<name>[\w-]+))?\.(?P<param>weight|bias)$")
_EMBED = re.compile(r"^(?P<mod>.+)\.(?P<half>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[\w-]+))?$")
_DORA = ".lora_magnitude_vector"


def has_peft_keys(keys: list[str]) -> bool:
    return any(_LINEAR.match(k) or _EMBED.match(k) for k in keys)


@dataclass
class _Pair:
    a_key: str | None = None
    b_key: str | None = None
    embedding: bool = False


@dataclass(frozen=True)
class PeftModule:
    """One module as the header and config describe it: its keys, rank, shapes, kind, alpha and scale."""

    name: str
    a_key: str
    b_key: str
    rank: int
    d_out: int
    d_in: int
    weight_shape: tuple[int, ...]
    kind: ModuleKind
    fan_in_fan_out: bool
    alpha: float
    scale: float


@dataclass(frozen=True)
class PeftLayout:
    """Every module (natural order) and what the file holds besides LoRA pairs."""

    modules: dict[str, PeftModule]
    unknown_keys: list[str]
    saved_modules: list[str]  # modules_to_save tensors (full weights, dropped)
    base_layers: list[str]  # saved base weights (save_embedding_layers), dropped
    key_prefix: str
    alpha_assumed: bool  # no lora_alpha in the config: scale 1 assumed
    fan_in_fan_out: bool


def is_peft_folder(path: Path) -> bool:
    """A folder that holds a PEFT adapter (``adapter_config.json`` or ``adapter_model.*``)."""
    return path.is_dir() and ((path / "adapter_config.json").is_file() or any(path.glob("adapter_model.*")))


def locate(path: Path, allow_pickle: bool) -> tuple[Path, Path | None]:
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                weights = path / name
                break
        else:
            raise LoraMergeError(
                f"{path}: no adapter_model.safetensors in this folder; point at a PEFT adapter folder "
                "or a .safetensors file"
            )
        cfg = path / "adapter_config.json"
        return weights, cfg if cfg.is_file() else None
    if not path.exists():
        raise LoraMergeError(f"{path}: no such file or folder")
    cfg = path.parent / "adapter_config.json"
    return path, cfg if cfg.is_file() else None


def read_config(p: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise LoraMergeError(f"{p}: not valid JSON ({str(e)[:200]})") from None
    except OSError as e:
        raise LoraMergeError(f"{p}: cannot be read ({e.strerror or e})") from None
    if not isinstance(cfg, dict):
        raise LoraMergeError(f"{p}: expected a JSON object")
    validate_config(cfg, p)
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise LoraMergeError(f"{p}: peft_type is {ptype}; only LoRA adapters can be read")
    if cfg.get("use_dora"):
        raise LoraMergeError(
            f"{p}: use_dora is true; DoRA rescales W+ΔW by a per-row magnitude that depends on the base "
            "weight, so it is not a sum of rank units and cannot be merged as a LoRA"
        )
    if cfg.get("lora_bias"):
        raise LoraMergeError(f"{p}: lora_bias is true; trained LoRA biases cannot be represented as rank units")
    return cfg


def peft_layout(src: SafetensorsHeader, config: dict[str, Any], *, ignore_modules_to_save: bool = False,
                strict: bool = True) -> PeftLayout:
    """The modules of PEFT-style keys in ``src`` with a (possibly empty) config.

    ``strict``: keys we cannot interpret are an error (merges); ``strict=False`` lists them in
    ``unknown_keys`` instead (inspect).
    """
    f = src.path
    pairs: dict[str, _Pair] = {}
    unknown: list[str] = []
    saved_modules: list[str] = []
    base_layers: list[str] = []  # PEFT saves full embedding weights (save_embedding_layers): not ΔW
    prefix = None
    for key in src.keys:
        if _DORA in key:
            raise LoraMergeError(f"{f}: key {key} is a DoRA magnitude vector; DoRA adapters cannot be merged as LoRAs")
        m = _LINEAR.match(key) or _EMBED.match(key)
        if m is None:
            if key.endswith(".base_layer.weight"):
                base_layers.append(key)
            elif "modules_to_save" in key or _is_saved_module(key, config.get("modules_to_save") or []):
                saved_modules.append(key)
            else:
                unknown.append(key)
            continue
        if m.groupdict().get("param") == "bias":
            raise LoraMergeError(
                f"{f}: key {key} is a trained LoRA bias (lora_bias); it cannot be represented as rank units"
            )
        mod = m.group("mod")
        if prefix is None:
            prefix = PEFT_PREFIX if mod.startswith(PEFT_PREFIX) else ""
        if mod.startswith(PEFT_PREFIX):
            mod = mod[len(PEFT_PREFIX):]
        pair = pairs.setdefault(mod, _Pair())
        half = m.group("half")
        pair.embedding = half.startswith("lora_embedding")
        if half.endswith("A"):
            pair.a_key = key
        else:
            pair.b_key = key

    if saved_modules and not ignore_modules_to_save:
        raise LoraMergeError(
            f"{f}: holds {len(saved_modules)} full tensors from modules_to_save (e.g. {saved_modules[0]}); "
            "these are not LoRA updates and cannot be merged; pass «ignore_modules_to_save» to drop them"
        )
    bias_mode = config.get("bias", "none")
    if bias_mode not in (None, "none") and any(k.endswith(".bias") for k in unknown):
        raise LoraMergeError(
            f"{f}: the adapter trains biases (bias={bias_mode!r}, e.g. "
            f"{next(k for k in unknown if k.endswith('.bias'))}); biases cannot be represented as rank units"
        )
    if unknown and strict:
        shown = ", ".join(unknown[:3]) + (" …" if len(unknown) > 3 else "")
        raise LoraMergeError(
            f"{f}: {len(unknown)} keys are not PEFT LoRA weights ({shown}); run `loramerge inspect` to see them"
        )
    if not pairs:
        raise LoraMergeError(f"{f}: no LoRA weights found (expected keys ending in lora_A.weight / lora_B.weight)")

    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    use_rslora = bool(config.get("use_rslora", False))
    default_alpha = config.get("lora_alpha")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    cfg_r = config.get("r")
    modules: dict[str, PeftModule] = {}
    for mod in sorted(pairs, key=natural_key):
        p = pairs[mod]
        if p.a_key is None or p.b_key is None:
            present = p.a_key or p.b_key
            missing = "A" if p.a_key is None else "B"
            raise LoraMergeError(f"{f}: module {mod} has {present} but no lora_{missing} half; the file is incomplete")
        rank, d_out, d_in, ws, kind, fifo = _shapes(f, p, src, fan_in_fan_out)
        expected_r = pattern_value(rank_pattern, mod, cfg_r)
        if config and expected_r is not None and int(expected_r) != rank:
            raise LoraMergeError(
                f"{f}: module {mod} has rank {rank} in {p.a_key} but the config says r={expected_r}; "
                "the config and the weights disagree"
            )
        alpha = pattern_value(alpha_pattern, mod, default_alpha)
        if alpha is None:  # bare file without config: PEFT cannot load it either; assume scale 1
            alpha = float(rank)
        alpha = float(alpha)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        modules[mod] = PeftModule(mod, p.a_key, p.b_key, rank, d_out, d_in, ws, kind, fifo, alpha, scale)
    return PeftLayout(modules, unknown, saved_modules, base_layers, prefix or "", default_alpha is None,
                      fan_in_fan_out)


def _shapes(f: Path, p: _Pair, src: SafetensorsHeader, fan_in_fan_out: bool
            ) -> tuple[int, int, int, tuple[int, ...], ModuleKind, bool]:
    """(rank, d_out, d_in, weight_shape, kind, fan_in_fan_out) of one pair, from the header's shapes."""
    assert p.a_key is not None and p.b_key is not None
    a_shape, b_shape = src.check_factor(p.a_key), src.check_factor(p.b_key)
    if p.embedding:
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise LoraMergeError(f"{f}: {p.a_key} {a_shape} and {p.b_key} {b_shape} do not form an embedding LoRA pair")
        r, num_emb = a_shape
        emb_dim = b_shape[0]
        return r, emb_dim, num_emb, (num_emb, emb_dim), "embedding", False
    r = a_shape[0]
    if len(b_shape) < 2 or b_shape[1] != r or any(s != 1 for s in b_shape[2:]):
        raise LoraMergeError(
            f"{f}: {p.a_key} has shape {a_shape} but {p.b_key} has shape {b_shape}; lora_B must be [out, {r}]"
        )
    d_out = b_shape[0]
    if len(a_shape) == 2:
        d_in = a_shape[1]
        ws = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
        return r, d_out, d_in, ws, "linear", fan_in_fan_out
    if len(b_shape) != len(a_shape):
        raise LoraMergeError(f"{f}: conv LoRA {p.a_key} {a_shape} and {p.b_key} {b_shape} differ in rank of shape")
    d_in = int(math.prod(a_shape[1:]))
    return r, d_out, d_in, (d_out, *a_shape[1:]), "conv", False


def _is_saved_module(key: str, saved: list[str] | str) -> bool:
    names = [saved] if isinstance(saved, str) else list(saved)
    parts = key.split(".")
    return any(n in parts for n in names)


def label_of(f: Path) -> str:
    """The adapter's label: its folder's name for adapter_model.*, else the file's stem."""
    return f.parent.name if f.name.startswith("adapter_model") else f.stem
