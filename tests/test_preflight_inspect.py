"""Pre-flight compatibility and `loramerge inspect` on real adapters."""

import json

import pytest
from helpers import make_peft_adapter
from test_errors import edit_config, run_cli

from mergekit_lora import LoraMergeError, check_compatible, load_adapter


def test_different_base_models_are_refused(tmp_path):
    a = edit_config(make_peft_adapter(tmp_path / "a", "llama"), base_model_name_or_path="org/llama-a")
    b = edit_config(make_peft_adapter(tmp_path / "b", "llama"), base_model_name_or_path="org/llama-b")
    with pytest.raises(LoraMergeError, match="different base models .*org/llama-a.*org/llama-b"):
        check_compatible([load_adapter(a), load_adapter(b)])


def test_shape_mismatch_names_modules(tmp_path):
    a = load_adapter(make_peft_adapter(tmp_path / "a", "llama"))
    b = load_adapter(make_peft_adapter(tmp_path / "b", "gpt2", target_modules=["c_attn"]))
    b.modules = {"model.layers.0.self_attn.q_proj": b.modules["transformer.h.0.attn.c_attn"]}
    with pytest.raises(LoraMergeError, match=r"1 modules have different shapes.*model.layers.0.self_attn.q_proj"):
        check_compatible([a, b])


def test_partial_modules_policies(tmp_path):
    a = load_adapter(make_peft_adapter(tmp_path / "a", "llama", target_modules=["q_proj", "v_proj"]))
    b = load_adapter(make_peft_adapter(tmp_path / "b", "llama", target_modules=["q_proj", "k_proj"]))
    union = check_compatible([a, b], "union")
    inter = check_compatible([a, b], "intersection")
    assert len(union.names) == 6 and len(inter.names) == 2
    assert sorted(union.partial)[:1] == ["model.layers.0.self_attn.k_proj"]
    assert {inter.present[n] for n in inter.names} == {(0, 1)}
    with pytest.raises(LoraMergeError, match="missing from some inputs"):
        check_compatible([a, b], "error")


def test_union_merge_counts_missing_module_as_zero(tmp_path):
    from mergekit_lora import merge

    pa = make_peft_adapter(tmp_path / "a", "llama", target_modules=["q_proj", "v_proj"])
    pb = make_peft_adapter(tmp_path / "b", "llama", target_modules=["q_proj", "k_proj"], seed=2)
    merge([pa, pb], "linear", tmp_path / "o", weights=[1.0, 0.5])
    out, b = load_adapter(tmp_path / "o"), load_adapter(pb)
    k = "model.layers.1.self_attn.k_proj"
    assert out.units(k).distance(b.units(k).scaled(0.5)) < 1e-6 * b.units(k).norm()
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["k_proj", "q_proj", "v_proj"]


def test_inspect_reports_ranks_scales_and_norms(tmp_path):
    p = make_peft_adapter(tmp_path / "a", "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          rank_pattern={"v_proj": 2})
    result = run_cli("inspect", p, "--json", "--modules")
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["format"] == "peft" and r["modules"] == 4
    assert r["rank"] == {"min": 2, "max": 4, "counts": {"2": 2, "4": 2}}
    assert r["parameters"] == 2 * (4 * (32 + 32) + 2 * (32 + 16))
    a = load_adapter(p)
    q = r["groups"]["model.layers.*.self_attn.q_proj"]
    expected = sum(a.units(f"model.layers.{i}.self_attn.q_proj").norm() ** 2 for i in range(2)) ** 0.5
    assert q["delta_norm"] == pytest.approx(expected, rel=1e-9)
    table = run_cli("inspect", p)
    assert table.exit_code == 0 and "model.layers.*.self_attn.v_proj" in table.output


def test_version_and_methods():
    assert run_cli("--version").output.strip().startswith("loramerge ")
    out = json.loads(run_cli("methods", "--json").output)
    assert {"linear", "cat"} <= {m["name"] for m in out}


def test_typo_in_a_local_path_says_it_is_not_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run_cli("inspect", "adapters/nope")
    assert r.exit_code == 2
    assert "adapters/nope: no such local file or folder (and as a Hub repo:" in " ".join(r.output.split())


def test_bad_missing_policy_is_refused_by_the_driver_before_any_read(tmp_path):
    from mergekit_lora import merge

    with pytest.raises(LoraMergeError, match=r"missing: must be union, intersection or error \(got 'bogus'\)"):
        merge([tmp_path / "does-not-exist"], "linear", tmp_path / "o", missing="bogus")  # type: ignore[arg-type]
    for cmd in (["merge"], ["cluster", "-k", "2"], ["route", "--top-k", "2"]):
        r = run_cli(*cmd, "examples/tiny-llama-shift", "--missing", "bogus", "-o", tmp_path / "o")
        assert r.exit_code == 2 and "--missing: must be union" in r.output, (cmd, r.output)
    assert not (tmp_path / "o").exists()
