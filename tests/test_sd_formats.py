"""kohya / diffusers SD LoRA formats: read, round trip, diffusers as a real client, refusals, merges."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from sd_helpers import (
    diffusers_state_dict,
    kohya_delta,
    kohya_of,
    kohya_state_dict,
    save,
    sd_modules,
    tiny_clip,
    tiny_unet,
)
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError, load_adapter, merge
from mergekit_lora.atomic import atomic_output
from mergekit_lora.cli.main import app
from mergekit_lora.formats.diffusers import write_diffusers
from mergekit_lora.formats.kohya import write_kohya
from mergekit_lora.formats.request import WriteRequest
from mergekit_lora.formats.sd_meta import canonical_bytes, data_section
from mergekit_lora.inspect import inspect_adapter

runner = CliRunner()
SD1 = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora", "ss_network_dim": "4",
       "ss_network_alpha": "2.0", "modelspec.title": "tiny"}


def _write(tmp_path, writer, a, name="out"):
    with atomic_output(tmp_path / name) as tmp:
        writer(WriteRequest(tmp, a.iter_units(), [a], torch.float32, method="identity"))
    return next((tmp_path / name).glob("*.safetensors"))


def test_kohya_read_matches_file_tensors(tmp_path):
    sd = kohya_state_dict(alpha=2.0)
    a = load_adapter(save(tmp_path / "k.safetensors", sd, SD1))
    assert a.meta.format == "kohya" and a.meta.extra["base_family"] == "sd1"
    assert len(a) == len(sd_modules())
    convs = [i for i in a.modules.values() if i.kind == "conv"]
    assert any(i.weight_shape[2:] == (3, 3) for i in convs) and any(i.weight_shape[2:] == (1, 1) for i in convs)
    for name, info in a.modules.items():
        assert info.scale == 0.5
        torch.testing.assert_close(a.units(name).delta_weight(), kohya_delta(sd, name), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [2.0, None])
def test_kohya_roundtrip_bit_identical(tmp_path, alpha):
    a = load_adapter(save(tmp_path / "k.safetensors", kohya_state_dict(alpha=alpha), SD1))
    b = load_adapter(_write(tmp_path, write_kohya, a))
    assert b.meta.format == "kohya" and list(b.modules) == list(a.modules)
    for n in a.modules:
        assert b.modules[n].scale == 1.0 and b.modules[n].weight_shape == a.modules[n].weight_shape
        assert torch.equal(b.units(n).delta_weight(), a.units(n).delta_weight())


@pytest.mark.parametrize("style", ["peft", "lora", "linear_layer", "processor"])
def test_diffusers_styles_roundtrip_bit_identical(tmp_path, style):
    ref = load_adapter(save(tmp_path / "ref.safetensors", diffusers_state_dict(style="peft")))
    a = load_adapter(save(tmp_path / "d.safetensors", diffusers_state_dict(style=style)))
    assert a.meta.format == "diffusers" and set(a.modules) == set(sd_modules())
    b = load_adapter(_write(tmp_path, write_diffusers, a))
    for n in a.modules:
        assert torch.equal(a.units(n).delta_weight(), ref.units(n).delta_weight())
        assert torch.equal(b.units(n).delta_weight(), a.units(n).delta_weight())


def _peft_deltas(model, adapter):
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight(adapter) for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def test_kohya_file_loads_through_diffusers_conversion(tmp_path):
    """Our kohya output -> diffusers' own kohya conversion + PEFT injection: no leftover keys, same ΔW."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    src = load_adapter(save(tmp_path / "k.safetensors", kohya_state_dict(alpha=2.0), SD1))
    ours = load_adapter(_write(tmp_path, write_kohya, src))
    state, alphas = Mixin.lora_state_dict(str(ours.path))  # raises on any key it cannot rename
    unet, te = tiny_unet(), tiny_clip()
    Mixin.load_lora_into_unet(state, alphas, unet, adapter_name="m")
    Mixin.load_lora_into_text_encoder(state, alphas, te, adapter_name="m")
    got = {f"unet.{k}": v for k, v in _peft_deltas(unet, "m").items()}
    got.update({f"text_encoder.{k}": v for k, v in _peft_deltas(te, "m").items()})
    assert set(got) == set(sd_modules())  # every module of ours arrived, nothing else
    for mod, d in got.items():
        want = ours.units(kohya_of(mod)).delta_weight()
        assert d.shape == want.shape
        assert (d - want).norm() / want.norm() < 1e-6


def test_diffusers_file_loads_in_diffusers_with_mixed_ranks(tmp_path):
    """A cat merge (ranks 4+2 on unet attention, 4 elsewhere) written as diffusers loads with exact scales."""
    a = save(tmp_path / "a.safetensors", diffusers_state_dict(seed=1, r=4))
    sd_b = {k: v for k, v in diffusers_state_dict(seed=2, r=2).items() if "attn1" in k}
    b = save(tmp_path / "b.safetensors", sd_b)
    merge([a, b], "cat", tmp_path / "m")
    out = load_adapter(tmp_path / "m")
    assert {i.rank for i in out.modules.values()} == {4, 6}
    unet = tiny_unet()
    unet.load_lora_adapter(str(tmp_path / "m"), weight_name="pytorch_lora_weights.safetensors", prefix="unet",
                           adapter_name="m")
    got = _peft_deltas(unet, "m")
    assert len(got) == sum(n.startswith("unet.") for n in out.modules)
    for n, d in got.items():
        want = out.units(f"unet.{n}").delta_weight()
        assert (d - want).norm() / want.norm() < 1e-6


@pytest.mark.parametrize("suffix,label", [(".lora_mid.weight", "LoCon/Tucker"), (".dora_scale", "DoRA"),
                                          (".hada_w1_a", "LoHa"), (".lokr_w1", "LoKr")])
def test_unsupported_variants_are_refused_by_name_and_count(tmp_path, suffix, label):
    sd = kohya_state_dict(only="unet.down_blocks.0.resnets")
    names = sorted({k.split(".")[0] for k in sd})
    for n in names:
        sd[n + suffix] = torch.zeros(2, 2)
    p = save(tmp_path / "v.safetensors", sd)
    with pytest.raises(LoraMergeError, match=rf"{label}.*{len(names)} keys"):
        load_adapter(p)
    r = runner.invoke(app, ["merge", str(p), str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and label in r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unknown_keys_are_listed_and_nothing_written(tmp_path):
    sd = kohya_state_dict(only="unet.down_blocks.0.resnets")
    sd["lora_unet_down_blocks_0_resnets_0_conv1.diff"] = torch.zeros(2)
    sd["some_embedding"] = torch.zeros(2)
    p = save(tmp_path / "u.safetensors", sd)
    with pytest.raises(LoraMergeError, match=r"2 keys .*conv1\.diff.*some_embedding"):
        load_adapter(p)
    r = runner.invoke(app, ["merge", str(p), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "some_embedding" in r.output and not (tmp_path / "out").exists()
    assert sorted(inspect_adapter(p)["unknown_keys"]) == ["lora_unet_down_blocks_0_resnets_0_conv1.diff", "some_embedding"]


def test_cli_merge_two_kohya_files_writes_kohya_with_metadata(tmp_path):
    sda, sdb = kohya_state_dict(seed=1, alpha=2.0), kohya_state_dict(seed=2, r=2, alpha=None)
    a, b = save(tmp_path / "a.safetensors", sda, SD1), save(tmp_path / "b.safetensors", sdb, SD1)
    for method in ("linear", "cat"):
        out = tmp_path / method
        r = runner.invoke(app, ["merge", str(a), str(b), "--method", method, "--weights", "0.5,1", "-o", str(out)])
        assert r.exit_code == 0, r.output
        f = out / "lora.safetensors"
        m = load_adapter(f)
        assert m.meta.format == "kohya" and m.meta.extra["base_family"] == "sd1"
        for n in m.modules:
            want = 0.5 * kohya_delta(sda, n) + kohya_delta(sdb, n)
            assert (m.units(n).delta_weight() - want).norm() / want.norm() < 1e-6
        with safe_open(str(f), "pt") as fh:
            md = fh.metadata()
        raw = f.read_bytes()
        assert md["sshs_model_hash"] == hashlib.sha256(data_section(raw)).hexdigest()
        assert md["modelspec.hash_sha256"] == "0x" + md["sshs_model_hash"]
        ss = {k: v for k, v in md.items() if k.startswith("ss_")}
        legacy = canonical_bytes(load_file(str(f)), ss)
        assert md["sshs_legacy_hash"] == hashlib.sha256(legacy[0x100000:0x110000]).hexdigest()[:8]
        assert md["ss_base_model_version"] == "sd_v1" and md["ss_network_module"] == "networks.lora"
        assert md["ss_network_dim"] == md["ss_network_alpha"] == "6"
        recipe = json.loads(md["mergekit_lora.recipe"])
        assert recipe["method"] == method and recipe["weights"] == [0.5, 1.0]
        assert md["modelspec.title"] == f"{method} merge of tiny, tiny" and md["modelspec.merged_from"] == "tiny, tiny"
    # same inputs -> identical bytes
    runner.invoke(app, ["merge", str(a), str(b), "--method", "cat", "--weights", "0.5,1", "-o", str(tmp_path / "again")])
    assert (tmp_path / "again" / "lora.safetensors").read_bytes() == (tmp_path / "cat" / "lora.safetensors").read_bytes()


def test_cluster_on_two_kohya_files_writes_kohya(tmp_path):
    """LoRA-LEGO through `loramerge cluster` keeps the kohya family; k ≥ pool with lsq is exactly LEGO's target,
    the weighted average Σ wᵢ ΔWᵢ / Σ |wᵢ| (conv units too)."""
    sda, sdb = kohya_state_dict(seed=1, alpha=2.0), kohya_state_dict(seed=2, r=2, alpha=None)
    a, b = save(tmp_path / "a.safetensors", sda, SD1), save(tmp_path / "b.safetensors", sdb, SD1)
    r = runner.invoke(app, ["cluster", str(a), str(b), "-k", "16", "--weights", "0.5,1", "--reweight", "lsq",
                              "-o", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    m = load_adapter(tmp_path / "c" / "lora.safetensors")
    assert m.meta.format == "kohya" and m.meta.extra["base_family"] == "sd1"
    for n in m.modules:
        want = (0.5 * kohya_delta(sda, n) + kohya_delta(sdb, n)) / 1.5
        assert (m.units(n).delta_weight() - want).norm() / want.norm() < 1e-6
    r = runner.invoke(app, ["cluster", str(a), str(b), "-k", "2", "-o", str(tmp_path / "c2")])
    assert r.exit_code == 0, r.output
    assert {i.rank for i in load_adapter(tmp_path / "c2" / "lora.safetensors").modules.values()} == {2}


def test_sdxl_and_sd15_merge_is_a_preflight_error(tmp_path):
    a = save(tmp_path / "a.safetensors", kohya_state_dict(seed=1), SD1)
    b = save(tmp_path / "b.safetensors", kohya_state_dict(seed=2), {**SD1, "ss_base_model_version": "sdxl_base_v1-0"})
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "different model families" in r.output and "sdxl" in r.output
    assert not (tmp_path / "out").exists()


def test_base_family_from_real_shapes_and_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    def pair(name, out_f, in_f):
        return {f"{name}.lora_down.weight": torch.randn(2, in_f, generator=g),
                f"{name}.lora_up.weight": torch.randn(out_f, 2, generator=g)}
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert load_adapter(save(tmp_path / "1.safetensors", pair(k, 320, 768))).meta.extra["base_family"] == "sd1"
    assert load_adapter(save(tmp_path / "2.safetensors", pair(k, 320, 1024))).meta.extra["base_family"] == "sd2"
    xl = {**pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048),
          **pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)}
    assert load_adapter(save(tmp_path / "x.safetensors", xl)).meta.extra["base_family"] == "sdxl"
    fl = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
          "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 2, generator=g)}
    a = load_adapter(save(tmp_path / "f.safetensors", fl))
    assert a.meta.format == "diffusers" and a.meta.extra["base_family"] == "flux"


def test_kohya_plus_diffusers_merge_normalises_to_kohya_names(tmp_path):
    sdk = kohya_state_dict(seed=1, alpha=2.0)
    k = save(tmp_path / "k.safetensors", sdk)
    d = save(tmp_path / "d.safetensors", diffusers_state_dict(seed=2, style="processor"))
    dk = load_adapter(d)
    merge([k, d], "linear", tmp_path / "m", weights=[1.0, 1.0])
    m = load_adapter(tmp_path / "m")
    assert m.meta.format == "kohya" and len(m) == len(sd_modules())
    for mod in sd_modules():
        want = kohya_delta(sdk, kohya_of(mod)) + dk.units(mod).delta_weight()
        got = m.units(kohya_of(mod)).delta_weight()
        assert (got - want).norm() / want.norm() < 1e-6
    # kohya files with the original SGM block names cannot be lined up with diffusers paths
    sgm = {k.replace("lora_unet_down_blocks_0_resnets_0", "lora_unet_input_blocks_1_0"): v for k, v in sdk.items()}
    s = save(tmp_path / "sgm.safetensors", sgm)
    with pytest.raises(LoraMergeError, match="block names.*input_blocks"):
        merge([s, d], "linear", tmp_path / "m2")
    assert not (tmp_path / "m2").exists()


def test_format_choices_refuse_what_cannot_be_written(tmp_path):
    k = save(tmp_path / "k.safetensors", kohya_state_dict(only="unet.down_blocks.0.resnets"))
    with pytest.raises(LoraMergeError, match="kohya names cannot be mapped back"):
        merge([k], "linear", tmp_path / "d", output_format="diffusers")
    with pytest.raises(LoraMergeError, match="output_format kohya or output_format diffusers"):
        merge([k], "linear", tmp_path / "p", output_format="peft")
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()
    d = save(tmp_path / "d.safetensors", diffusers_state_dict())
    merge([d], "linear", tmp_path / "dk", output_format="kohya")
    conv = load_adapter(tmp_path / "dk")
    src = load_adapter(d)
    for mod in sd_modules():
        assert torch.equal(conv.units(kohya_of(mod)).delta_weight(), src.units(mod).delta_weight())


def test_inspect_shows_sd_details(tmp_path):
    p = save(tmp_path / "k.safetensors", kohya_state_dict(only="unet.down_blocks.0"), SD1)
    r = runner.invoke(app, ["inspect", str(p)])
    assert r.exit_code == 0, r.output
    assert "kohya (sd1)" in r.output and "ss_network_dim=4" in r.output and "conv_modules=" in r.output
