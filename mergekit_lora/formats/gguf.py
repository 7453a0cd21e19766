"""Write rank units as a llama.cpp LoRA adapter (GGUF), as llama.cpp's ``convert_lora_to_gguf.py`` lays it out.

File layout (what ``llama_adapter_lora_init`` checks):

* KV: ``general.architecture`` (the base GGUF's), ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (float32).
* Per module, two tensors named after the base tensor: ``blk.N.attn_q.weight.lora_a`` with numpy shape
  [r, d_in] (ggml ne = [d_in, r]) and ``….lora_b`` with numpy shape [d_out, r] (ne = [r, d_out]), i.e. PEFT's
  ``lora_A`` / ``lora_B`` unchanged.  Token embeddings store ``lora_a`` transposed ([d_vocab, r]).
* llama.cpp scales every module by ``alpha / r`` (r = that module's rank, one alpha per file).  The scale is
  already folded into our B, so alpha is the most common rank and a module of rank r_m ≠ alpha stores
  ``B · r_m / alpha``: the update llama.cpp applies is exactly ``B @ A``.
* The ``llama`` architecture stores Q and K with their rows permuted for its rope layout (the converter's
  ``LlamaModel.permute``); only B's rows move, A is unchanged.

HF module names map to GGUF names by a small table per architecture; anything else is refused by name.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..arrays import torch_dtype
from ..errors import LoraMergeError
from ..units import RankUnits
from .gguf_spec import GGUF_NAME
from .request import WriteRequest

# HF sub-module (inside ``model.layers.N.``) -> GGUF tensor stem (``blk.N.<stem>.weight``).
_LAYER_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Whole-model modules.
_GLOBAL_MODULES = {"model.embed_tokens": "token_embd", "lm_head": "output"}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class GGUFArch:
    """How one llama.cpp architecture names and lays out the tensors a LoRA can touch."""

    name: str
    permute_qk: bool  # Q/K rows permuted for rope (convert_hf_to_gguf's LlamaModel.permute)


# Architectures whose HF layout is Llama's (q/k/v/o, gate/up/down); others are refused by name.
ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("llama", permute_qk=True),
    "qwen2": GGUFArch("qwen2", permute_qk=False),
    "qwen3": GGUFArch("qwen3", permute_qk=False),
}


@dataclass(frozen=True)
class GGUFBase:
    """What the writer needs from the base model: architecture, head counts, base tensor shapes (ne)."""

    arch: GGUFArch
    head_count: int | None = None
    head_count_kv: int | None = None
    tensors: dict[str, tuple[int, ...]] | None = None  # base tensor name -> ggml ne (None: unchecked)


def _arch(name: str) -> GGUFArch:
    if name not in ARCHITECTURES:
        raise LoraMergeError(f"GGUF export does not support the architecture {name!r}; supported: "
                             f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


# GGUF value types -> struct format of a scalar (8: string, 9: array are handled apart).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(scalar and string KVs, tensor name -> ggml ne) of a little-endian GGUF v2/v3 file.

    Arrays (the tokenizer's 50k strings) are skipped, not decoded: ``gguf.GGUFReader`` decodes every
    element and takes ~10 s on a 135M model, this reads the header in well under a second."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", m, pos)
            pos += 8 + n
            return m[pos - n:pos].decode("utf-8", errors="replace")

        def skip(vtype: int) -> Any:
            nonlocal pos
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if etype in (8, 9):
                    for _ in range(count):
                        skip(etype)
                else:
                    pos += count * struct.calcsize("<" + _SCALAR[etype])
                return None
            fmt = "<" + _SCALAR[vtype]
            (v,) = struct.unpack_from(fmt, m, pos)
            pos += struct.calcsize(fmt)
            return v

        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", m, pos)
            pos += 4
            kv[key] = skip(vtype)
        tensors: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            name = string()
            (nd,) = struct.unpack_from("<I", m, pos)
            tensors[name] = struct.unpack_from(f"<{nd}Q", m, pos + 4)
            pos += 4 + 8 * nd + 4 + 8  # dims, ggml type, data offset
    return kv, tensors


def read_base(path: str | Path) -> GGUFBase:
    """Architecture, head counts and tensor shapes of a base model GGUF (header only, no tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise LoraMergeError(f"{path}: base GGUF file not found; give the .gguf of the base model")
    try:
        kv, tensors = read_header(path)
    except (ValueError, KeyError, UnicodeDecodeError, OSError, struct.error) as e:
        raise LoraMergeError(f"{path}: not a readable GGUF file ({e})") from None
    arch_name = kv.get("general.architecture")
    if not arch_name:
        raise LoraMergeError(f"{path}: the GGUF has no general.architecture; is it a model file?")
    arch = _arch(str(arch_name))
    hc = kv.get(f"{arch.name}.attention.head_count")
    hkv = kv.get(f"{arch.name}.attention.head_count_kv", hc)
    return GGUFBase(arch, int(hc) if hc is not None else None, int(hkv) if hkv is not None else None,
                    {n: tuple(int(x) for x in ne) for n, ne in tensors.items()})


def resolve_base(base_gguf: str | Path | None = None, architecture: str | None = None,
                 head_count: int | None = None, head_count_kv: int | None = None) -> GGUFBase:
    """A :class:`GGUFBase` from a base GGUF file (preferred: names and shapes are then checked) or from an
    architecture name plus head counts."""
    if base_gguf is not None:
        base = read_base(base_gguf)
        if architecture is not None and architecture != base.arch.name:
            raise LoraMergeError(f"architecture {architecture!r} differs from the base GGUF's "
                                 f"{base.arch.name!r} ({base_gguf}); leave architecture unset")
        return base
    if architecture is None:
        raise LoraMergeError("GGUF export needs the base model: set base_gguf (the base model's .gguf) "
                             "or architecture")
    return GGUFBase(_arch(architecture), head_count, head_count_kv or head_count, None)


def gguf_tensor_name(module: str, arch: GGUFArch | str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight`` (the base tensor the LoRA pairs with)."""
    arch = _arch(arch) if isinstance(arch, str) else arch
    name = module.removeprefix("base_model.model.")
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MODULES:
        return f"blk.{int(m.group(1))}.{_LAYER_MODULES[m.group(2)]}.weight"
    if name in _GLOBAL_MODULES:
        return f"{_GLOBAL_MODULES[name]}.weight"
    known = ", ".join(sorted(_LAYER_MODULES)) + ", " + ", ".join(sorted(_GLOBAL_MODULES))
    raise LoraMergeError(f"module {module!r} has no GGUF tensor name for architecture {arch.name!r}; "
                         f"supported modules: model.layers.N.{{{known}}}")


def _permute_rows(B: torch.Tensor, n_head: int, module: str = "") -> torch.Tensor:
    """Reorder B's rows [d_out, r] like llama.cpp's Q/K permute: per head, interleaved halves -> halves."""
    d_out, r = B.shape
    if n_head <= 0 or d_out % (2 * n_head):
        raise LoraMergeError(f"module {module or 'Q/K'!r} has {d_out} output rows, which the base GGUF's {n_head} "
                             "attention heads cannot split into halves per head: the adapter was not trained on "
                             "this base model; pass the .gguf of the model it was trained on (--base-gguf)")
    return B.reshape(n_head, 2, d_out // n_head // 2, r).transpose(1, 2).reshape(d_out, r)


def gguf_factors(module: str, u: RankUnits, base: GGUFBase, alpha: float) -> tuple[str, np.ndarray, np.ndarray]:
    """The GGUF base tensor name and the float32 (lora_a, lora_b) arrays that make llama.cpp apply
    exactly ``u.delta()``.  Shapes: a [r, d_in] (token embeddings: [d_vocab, r]), b [d_out, r]."""
    if u.kind == "conv" or u.fan_in_fan_out:
        raise LoraMergeError(f"module {module!r}: GGUF export handles Linear and Embedding LoRAs only")
    name = gguf_tensor_name(module, base.arch)
    A = u.A.detach().to("cpu", torch.float64)
    B = u.B.detach().to("cpu", torch.float64) * (u.rank / alpha)  # llama.cpp multiplies by alpha / r
    if base.arch.permute_qk and name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = base.head_count if name.endswith(".attn_q.weight") else base.head_count_kv
        if heads is None:
            raise LoraMergeError(f"module {module!r}: the {base.arch.name} layout permutes Q/K rows by head; "
                                 "give base_gguf (or head_count/head_count_kv)")
        B = _permute_rows(B, heads, module)
    if u.kind == "embedding":  # llama.cpp gathers rows of lora_a by token id: [d_vocab, r]
        A = A.T
        want = (u.d_out, u.d_in)  # ne of token_embd = [d_model, d_vocab]
    else:
        want = (u.d_in, u.d_out)
    if base.tensors is not None:
        if name not in base.tensors:
            raise LoraMergeError(f"module {module!r}: the base GGUF has no tensor {name!r} (tied or absent); "
                                 "drop this module before exporting")
        if tuple(base.tensors[name]) != want:
            raise LoraMergeError(f"module {module!r}: ΔW of shape ne={list(want)} does not fit the base GGUF's "
                                 f"{name} ne={list(base.tensors[name])}; is this the adapter's base model?")
    return name, A.to(torch.float32).contiguous().numpy(), B.to(torch.float32).contiguous().numpy()


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _add(writer: Any, name: str, arr: np.ndarray, dtype: torch.dtype) -> None:
    from gguf import GGMLQuantizationType

    if dtype == torch.float32:
        writer.add_tensor(name, arr.astype(np.float32))
    elif dtype == torch.float16:
        writer.add_tensor(name, arr.astype(np.float16))
    elif dtype == torch.bfloat16:
        bits = torch.from_numpy(arr).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        writer.add_tensor(name, bits.reshape(arr.shape[0], arr.shape[1] * 2), raw_dtype=GGMLQuantizationType.BF16)
    else:
        raise LoraMergeError(f"GGUF export writes float32, float16 or bfloat16, not {dtype}")


def write_gguf(out_file: Path, modules: Iterable[tuple[str, RankUnits]], base: GGUFBase, *,
               dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``out_file`` (a llama.cpp LoRA GGUF) and return a summary (architecture, alpha, modules, ...).

    Modules are kept in arrival order; rank-0 modules (ΔW = 0) are left out.  Same inputs, same bytes."""
    from gguf import GGUFType, GGUFWriter, Keys

    dtype = torch_dtype(dtype)  # a plan or an adapter's header names it ("bfloat16")
    if dtype not in _DTYPES:
        raise LoraMergeError(f"GGUF export writes float32, float16 or bfloat16, not {dtype}")
    items = [(n, u) for n, u in modules]
    kept = [(n, u) for n, u in items if u.rank > 0]
    if not kept:
        raise LoraMergeError("GGUF export: the adapter has no module with a non-zero update")
    alpha = float(Counter(u.rank for _, u in kept).most_common(1)[0][0])
    factors = [gguf_factors(n, u, base, alpha) for n, u in kept]
    seen = Counter(name for name, _, _ in factors)
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise LoraMergeError(f"GGUF export: several modules map to {dup[0]!r}")
    w = GGUFWriter(str(out_file), base.arch.name)
    w.add_type(GGUFType.ADAPTER)
    w.add_string(Keys.Adapter.TYPE, "lora")
    w.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
    for k, v in sorted((metadata or {}).items()):
        w.add_string(k, str(v))
    for name, a, b in factors:
        _add(w, name + ".lora_a", a, dtype)
        _add(w, name + ".lora_b", b, dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"format": "gguf", "file": Path(out_file).name, "architecture": base.arch.name, "lora_alpha": alpha,
            "modules": len(factors), "zero_modules_skipped": len(items) - len(kept),
            "ranks": dict(Counter(u.rank for _, u in kept)), "dtype": _DTYPES[dtype]}


@dataclass(frozen=True)
class GGUFOptions:
    """The ``gguf`` writer's own options: ``base_gguf`` (the base model's .gguf: architecture, head counts,
    tensor names and shapes are read from it and checked) or ``architecture`` (+ ``head_count`` /
    ``head_count_kv`` for ``llama``)."""

    base_gguf: str | Path | None = None
    architecture: str | None = None
    head_count: int | None = None
    head_count_kv: int | None = None

    def base(self) -> GGUFBase:
        return resolve_base(self.base_gguf, self.architecture, self.head_count, self.head_count_kv)


def gguf_options(opts: Any) -> GGUFOptions:
    """The ``write_options`` hook: the GGUF options out of the run options (``MergeOptions.base_gguf``)."""
    return GGUFOptions(base_gguf=opts.base_gguf)


def gguf_writer(req: WriteRequest) -> dict[str, Any]:
    """The ``gguf`` output format: ``req.out_dir/adapter.gguf`` (``FormatSpec.file``: ``export`` renames it onto
    the file it was asked for).  The base model comes from ``req.options`` (:class:`GGUFOptions`)."""
    o = req.options if isinstance(req.options, GGUFOptions) else GGUFOptions()
    md = {"mergekit_lora.method": req.method} if req.method else {}
    bases = {a.meta.base_model for a in req.adapters if a.meta.base_model}
    if len(bases) == 1:
        md["mergekit_lora.base_model"] = next(iter(bases))
    return write_gguf(Path(req.out_dir) / GGUF_NAME, req.modules, o.base(), dtype=req.dtype, metadata=md)
