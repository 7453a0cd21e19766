"""Small hand-built adapters (no model needed) and the CLI assertions of the reliability tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

PEFT_W = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers.{i}.self_attn.{p}_proj"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def peft_tensors(seed: int = 0, r: int = 4, d: int = 16, layers: int = 2) -> dict[str, torch.Tensor]:
    g = _g(seed)
    out = {}
    for i in range(layers):
        for p in ("q", "v"):
            k = PREFIX.format(i=i, p=p)
            out[f"{k}.lora_A.weight"] = torch.randn(r, d, generator=g)
            out[f"{k}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.1
    return out


def peft_config(r: int = 4, **changes) -> dict:
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "tiny/base", "task_type": "CAUSAL_LM", "bias": "none"}
    cfg.update(changes)
    return cfg


def write_peft(path: Path, seed: int = 0, r: int = 4, tensors: dict | None = None, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else peft_tensors(seed, r), str(path / PEFT_W))
    (path / "adapter_config.json").write_text(json.dumps(config if config is not None else peft_config(r)))
    return path


def kohya_tensors(seed: int = 0, r: int = 4, d: int = 16) -> dict[str, torch.Tensor]:
    g = _g(seed)
    out = {}
    for blk in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"):
        out[f"{blk}.lora_down.weight"] = torch.randn(r, d, generator=g)
        out[f"{blk}.lora_up.weight"] = torch.randn(d, r, generator=g) * 0.1
        out[f"{blk}.alpha"] = torch.tensor(float(r))
    return out


def diffusers_tensors(seed: int = 0, r: int = 4, d: int = 16) -> dict[str, torch.Tensor]:
    g = _g(seed)
    out = {}
    for mod in ("unet.down_blocks.0.attentions.0.proj_in", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"):
        out[f"{mod}.lora_A.weight"] = torch.randn(r, d, generator=g)
        out[f"{mod}.lora_B.weight"] = torch.randn(d, r, generator=g) * 0.1
    return out


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def snapshot(*paths: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``paths``: (size, mtime_ns, bytes) — to assert inputs are unchanged."""
    out = {}
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            st = f.stat()
            out[str(f)] = (st.st_size, st.st_mtime_ns, f.read_bytes())
    return out


def debris(folder: Path) -> list[str]:
    """Temp/old/lock leftovers of atomic outputs in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and (
        ".tmp-" in p.name or ".old-" in p.name)) if folder.is_dir() else []


def assert_one_error(result, fragments, *, out: Path | None = None) -> str:
    """Exit 2, exactly one ``error:`` line naming every fragment, no traceback, no output, no debris."""
    text = result.output
    assert result.exit_code == 2, text
    assert text.count("error:") == 1, text
    assert "Traceback" not in text, text
    flat = " ".join(text.split())
    for frag in fragments:
        assert str(frag) in flat, (frag, text)
    if out is not None:
        parent = Path(os.path.abspath(out)).parent
        assert not debris(parent), debris(parent)
    return flat


def raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> Path:
    """Write a safetensors file by hand: name -> (dtype string, shape, data bytes), any dtype string."""
    import struct

    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name, (dtype, shape, blob) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def retype(tensors: dict[str, torch.Tensor], key: str, dtype: str, shape: list[int] | None = None,
           itemsize: int = 4) -> dict[str, tuple[str, list[int], bytes]]:
    """The entries of ``tensors`` for :func:`raw_safetensors`, with ``key`` given another dtype/shape."""
    out = {}
    for k, t in tensors.items():
        c = t.contiguous()
        out[k] = ({torch.float32: "F32", torch.float16: "F16"}[c.dtype], list(c.shape),
                  c.reshape(-1).view(torch.uint8).numpy().tobytes())
    shp = list(tensors[key].shape) if shape is None else shape
    n = 1
    for d in shp:
        n *= d
    out[key] = (dtype, shp, bytes(range(7, 7 + n * itemsize)) if n * itemsize < 240 else b"\x01" * (n * itemsize))
    return out


def required_params(method: str) -> list[str]:
    """``-p key=value`` flags for a method's required parameters (0.5 for floats, 2 otherwise)."""
    from mergekit_lora.registry import available

    algo = available()[method].load()()
    out = []
    for key, f in algo.Params.model_fields.items():
        if f.is_required():
            out += ["-p", f"{key}={0.5 if f.annotation is float else 2}"]
    return out

