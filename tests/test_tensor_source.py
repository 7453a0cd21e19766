"""The range reader behind TensorSource.get: byte-exact against safetensors' own loader."""

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
    with pytest.raises(LoraMergeError, match="cannot read tensor x"):
        src.get("x")
