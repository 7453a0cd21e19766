"""Our safetensors IO against the safetensors library: the range reader and the streaming writer."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.formats.tensors import TensorSource


def test_range_reads_equal_safetensors_for_every_dtype_and_empty_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.f32": torch.randn(5, 7, generator=g),
        "b.f16": torch.randn(3, 4, generator=g).half(),
        "c.bf16": torch.randn(2, 9, generator=g).bfloat16(),
        "d.f64": torch.randn(4, generator=g, dtype=torch.float64),
        "e.empty": torch.zeros(0, 6),
        "f.conv": torch.randn(8, 3, 3, 3, generator=g),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    src = TensorSource.open(path)
    ref = load_file(str(path))
    for key in reversed(src.keys):  # out of file order: every read seeks its own range
        got = src.get(key)
        assert got.dtype == ref[key].dtype and got.shape == ref[key].shape
        assert torch.equal(got, ref[key])
    got[...] = 0  # the returned tensor owns its memory (writable, not a view of a mapping)
    assert torch.equal(src.get("a.f32"), ref["a.f32"])


def test_truncated_file_is_one_clear_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.ones(1000)}, str(path))
    src = TensorSource.open(path)
    path.write_bytes(path.read_bytes()[:-100])  # cut after the header was read
    with pytest.raises(LoraMergeError, match="t.safetensors: the file changed after its header was read"):
        src.get("x")


def test_streaming_writer_round_trips_and_is_byte_deterministic(tmp_path):
    """safetensors 0.8 orders __metadata__ from a HashMap; our writer must not inherit that randomness."""
    from mergekit_lora.formats.safetensors_stream import SafetensorsStream

    g = torch.Generator().manual_seed(1)
    t = {"z.w": torch.randn(3, 4, generator=g), "a.h": torch.randn(5, generator=g).half(),
         "m.empty": torch.zeros(0, 3), "b.bf": torch.randn(2, 2, generator=g).bfloat16(),
         "c.t": torch.randn(4, 3, generator=g).T}  # non-contiguous input
    meta = {"format": "pt", "mergekit_lora.method": "linear", "z": "ü"}
    blobs = set()
    for i in range(4):
        with SafetensorsStream(tmp_path / f"{i}.safetensors", meta) as st:
            for k, v in t.items():
                st.add(k, v)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.safetensors" for i in range(4)]  # no temp left
    back = load_file(str(tmp_path / "0.safetensors"))
    assert sorted(back) == sorted(t) and all(torch.equal(back[k], v) for k, v in t.items())
    assert TensorSource.open(tmp_path / "0.safetensors").metadata == meta


def test_streaming_writer_leaves_nothing_on_error(tmp_path):
    from mergekit_lora.formats.safetensors_stream import SafetensorsStream

    with pytest.raises(ValueError, match="already written"), SafetensorsStream(tmp_path / "x.safetensors") as st:
        st.add("a", torch.ones(2))
        st.add("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget", ["bound", "too-small"])
def test_streaming_writer_with_a_reserved_header(tmp_path, budget):
    """With a header budget the data goes straight behind a reserved (space-padded) header; a budget
    that turns out too small falls back to moving the data.  Either way safetensors reads it back."""
    from mergekit_lora.formats.safetensors_stream import SafetensorsStream, header_budget

    t = {f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": torch.randn(4, 6) for i in range(5) for ab in "AB"}
    meta = {"format": "pt"}
    n = header_budget(list(t), meta) if budget == "bound" else 16
    with SafetensorsStream(tmp_path / "x.safetensors", meta, header_budget=n) as st:
        for k, v in t.items():
            st.add(k, v)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in t.items())
    size = (tmp_path / "x.safetensors").stat().st_size
    data = sum(v.numel() * 4 for v in t.values())
    header = size - data - 8
    assert header % 8 == 0
    if budget == "bound":
        assert header == n + (-n % 8)  # exactly the reserved region, padded with spaces
    else:
        assert header > n  # the header outgrew the budget and sits, whole, before the moved data
