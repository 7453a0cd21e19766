"""Routed format, routers and the route algorithm: exactness, hand-built selection, IO, inspect, CLI errors."""

import json

import pytest
import torch
from helpers import inputs_for, make_peft_adapter, outputs, peft_model, rel, tiny_gpt2, tiny_llama
from torch import nn
from typer.testing import CliRunner

from mergekit_lora import LoraMergeError, load_adapter, merge
from mergekit_lora.atomic import atomic_output
from mergekit_lora.cli.main import app
from mergekit_lora.formats.routed import RoutedUnits
from mergekit_lora.inspect import inspect_adapter
from mergekit_lora.pipeline import make_options
from mergekit_lora.routing import RoutedAdapter, load_routed, route, write_routed
from mergekit_lora.routing.routers import init_gate, route_weights
from mergekit_lora.routing.runtime import attach, detach
from mergekit_lora.units import RankUnits

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def two_adapters(tmp_path, model="llama"):
    if model == "gpt2":
        a = make_peft_adapter(tmp_path / "a", "gpt2", seed=1, target_modules=["c_attn", "c_fc"])
        b = make_peft_adapter(tmp_path / "b", "gpt2", seed=2, r=2, target_modules=["c_attn"])
    else:
        a = make_peft_adapter(tmp_path / "a", seed=1, lora_alpha=16)
        b = make_peft_adapter(tmp_path / "b", seed=2, r=6, use_rslora=True, target_modules=["q_proj", "o_proj"])
    return a, b


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_top_k_R_equals_cat(tmp_path, model):
    a, b = two_adapters(tmp_path, model)
    merge([a, b], "cat", tmp_path / "cat", weights=[0.7, 1.3])
    route([a, b], tmp_path / "routed", {"top_k": 1000}, [0.7, 1.3])  # capped at each module's R
    routed = load_routed(tmp_path / "routed")
    assert all(m.top_k == m.rank for m in routed.modules.values())
    want = outputs(peft_model(tmp_path / "cat", model), model)
    m = BUILD[model](0)
    attach(m, routed)
    assert rel(outputs(m, model), want) < 1e-6


def test_gate_router_at_full_activation_and_huge_temperature_equals_cat(tmp_path):
    a, b = two_adapters(tmp_path)
    merge([a, b], "cat", tmp_path / "cat", weights=[1.0, 1.0])  # route keeps every unit at full strength
    route([a, b], tmp_path / "routed", {"top_k": 1000, "router": "gate", "temperature": 1e9})
    m = tiny_llama(0)
    attach(m, load_routed(tmp_path / "routed"))
    assert rel(outputs(m, "llama"), outputs(peft_model(tmp_path / "cat"), "llama")) < 1e-6


def test_top_1_on_orthogonal_units_picks_the_expected_unit():
    # units: a_i = e_i, b_i = (i+1)·e_i, so unit i's term for token x is (i+1)·x_i·e_i
    A = torch.eye(4)
    B = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    ru = RoutedUnits(RankUnits.from_factors(A, B), "implicit", 1)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0],    # scores 1,0,0,0     -> unit 0
                      [1.0, 1.0, 0.0, 0.0],    # scores 1,2,0,0     -> unit 1
                      [0.0, 0.0, 1.0, 0.5],    # scores 0,0,3,2     -> unit 2
                      [0.0, 0.0, 0.5, 1.0],    # scores 0,0,1.5,4   -> unit 3
                      [-2.0, 0.9, 0.0, 0.0]])  # scores 2,1.8,0,0   -> unit 0 (sign does not matter)
    expected = [0, 1, 2, 3, 0]
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    attach(model, {"0": ru})
    with torch.no_grad():
        out = model(x)
    for t, e in enumerate(expected):
        want = torch.zeros(4)
        want[e] = (e + 1) * x[t, e]
        assert torch.equal(out[t], want), (t, out[t], want)
    # the weights say the same: exactly one active unit per token
    y = x @ A.T
    w, _ = route_weights("implicit", x, y, b_norm=B.norm(dim=0), bias=torch.zeros(4), top_k=1)
    assert w.argmax(-1).tolist() == expected and torch.equal(w.sum(-1), torch.ones(5))
    # a selection bias moves the choice without touching the output scale
    ru2 = RoutedUnits(ru.units, "implicit", 1, bias=torch.tensor([0.0, 0.0, 0.0, 5.0]))
    w2, _ = route_weights("implicit", x, y, b_norm=B.norm(dim=0), bias=ru2.bias, top_k=1)
    assert w2.argmax(-1).tolist() == [3] * 5


def test_gate_init_selects_like_implicit(tmp_path):
    a, b = two_adapters(tmp_path)
    u = RankUnits.concat([load_adapter(a).units("model.layers.0.self_attn.q_proj"),
                          load_adapter(b).units("model.layers.0.self_attn.q_proj", source=1)])
    h = torch.randn(50, u.d_in, generator=torch.Generator().manual_seed(0))
    y = h @ u.A.T
    kw = dict(b_norm=u.B.norm(dim=0), bias=torch.zeros(u.rank), top_k=3)
    wi, _ = route_weights("implicit", h, y, **kw)
    wg, logits = route_weights("gate", h, y, gate=init_gate(u), **kw)
    assert torch.equal(wi != 0, wg != 0)
    assert torch.allclose(wg.sum(-1), torch.full((50,), 3.0))  # k·softmax: mean active weight 1


def test_save_load_identical_outputs_and_adapter_view(tmp_path):
    a, b = two_adapters(tmp_path)
    merge([a, b], "route", tmp_path / "r", params={"top_k": 2, "router": "gate", "top_k_pattern": {"o_proj": 1}})
    routed = load_routed(tmp_path / "r")
    assert routed.modules["model.layers.0.self_attn.o_proj"].top_k == 1
    g = torch.Generator().manual_seed(3)
    mods = {n: RoutedUnits(m.units, "gate", m.top_k, 0.7, torch.rand(m.rank, generator=g),
                           m.gate + 0.1 * torch.randn(m.gate.shape, generator=g),
                           torch.rand(m.rank, generator=g)) for n, m in routed.modules.items()}
    ra = RoutedAdapter(mods, "base", ["a", "b"])
    with atomic_output(tmp_path / "saved") as tmp:
        write_routed(tmp, ra.modules.items(), base_model="base", sources=["a", "b"])
    back = load_routed(tmp_path / "saved")
    m1, m2 = tiny_llama(0), tiny_llama(0)
    attach(m1, ra)
    attach(m2, back)
    assert torch.equal(outputs(m1, "llama"), outputs(m2, "llama"))
    for n, m in back.modules.items():
        assert torch.equal(m.activation, mods[n].activation) and m.temperature == 0.7
    # load_adapter reads the folder as pooled units (ΔW at full activation) = the cat merge
    view = load_adapter(tmp_path / "r")
    merge([a, b], "cat", tmp_path / "cat", weights=[1.0, 1.0])  # route keeps every unit at full strength
    cat = load_adapter(tmp_path / "cat")
    assert view.meta.format == "routed" and set(view.module_names()) == set(cat.module_names())
    for n in cat.module_names():
        assert rel(view.units(n).delta(), cat.units(n).delta()) < 1e-6


def test_route_is_deterministic_and_inspect_reports_routing(tmp_path):
    a, b = two_adapters(tmp_path)
    for out in ("r1", "r2"):
        route([a, b], tmp_path / out, {"top_k": 3, "router": "gate"}, options=make_options(seed=4))
    f1, f2 = ((tmp_path / o / "routed_model.safetensors").read_bytes() for o in ("r1", "r2"))
    assert f1 == f2
    rep = inspect_adapter(tmp_path / "r1")
    assert rep["format"] == "routed" and rep["routing"]["router"] == "gate"
    assert rep["routing"]["top_k"] == "3" and rep["routing"]["sources"] == 2
    assert rep["routing"]["units"] == sum(m["R"] for m in rep["routing"]["per_module"].values())
    card = (tmp_path / "r1" / "README.md").read_text()
    assert "library_name: mergekit-lora" in card and "attach(" in card
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "r1")])
    assert res.exit_code == 0 and "router=gate" in res.output


def test_route_errors(tmp_path):
    a, _ = two_adapters(tmp_path)
    with pytest.raises(LoraMergeError, match="top_k"):
        merge([a], "route", tmp_path / "x", params={"top_k": 0})  # top_k ≥ 1 (default: half the input rank)
    with pytest.raises(LoraMergeError, match="writes the 'routed' format"):
        merge([a], "route", tmp_path / "x", params={"top_k": 2}, output_format="peft")
    with pytest.raises(LoraMergeError, match="routed modules only"):
        merge([a], "cat", tmp_path / "x", output_format="routed")
    assert not (tmp_path / "x").exists()
    conv = make_peft_adapter(tmp_path / "conv", "conv", target_modules=["conv"])
    with pytest.raises(LoraMergeError, match="conv LoRA"):
        route([conv], tmp_path / "x", {"top_k": 1})
    assert not (tmp_path / "x").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "routed_model.safetensors").write_bytes(b"")
    with pytest.raises(LoraMergeError, match="incomplete"):
        load_routed(tmp_path / "bad")


@pytest.mark.parametrize("args, message", [
    (["--router", "magic", "--top-k", "2"], "router: Input should be 'implicit', 'gate' or 'hierarchical'"),
    (["--top-k", "2", "--export-static"], "--export-static"),
    (["--top-k", "2", "--calibrate", "cal.jsonl"], "--calibrate needs the base model"),
    (["--top-k", "2", "--calibrate", "bad.jsonl", "--base", "base"], "bad.jsonl:2: not valid JSON"),
    (["--top-k", "2", "--calibrate", "text.jsonl", "--base", "base"], "need a tokenizer"),
    (["--top-k", "2", "--calibrate", "big.jsonl", "--base", "base"], "outside the model's vocabulary"),
    (["--top-k", "2", "--top-k-module", "q_proj"], "--top-k-module takes KEY=VALUE"),
    (["--top-k", "0"], "top_k"),
    (["--top-k", "2", "--device", "tpu"], "unknown device"),
])
def test_route_cli_errors(tmp_path, monkeypatch, args, message):
    a, _ = two_adapters(tmp_path)
    monkeypatch.chdir(tmp_path)
    tiny_llama(0).save_pretrained(str(tmp_path / "base"))
    (tmp_path / "cal.jsonl").write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [1, 2]}) + "\n{oops\n")
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "big.jsonl").write_text(json.dumps({"input_ids": [1, 5000]}) + "\n")
    res = CliRunner().invoke(app, ["route", str(a), *args, "-o", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_detach_after_gpt2_attach_restores_conv1d(tmp_path):
    a, b = two_adapters(tmp_path, "gpt2")
    route([a, b], tmp_path / "r", {"top_k": 2})
    m = tiny_gpt2(0)
    before = outputs(m, "gpt2")
    originals = {n: m.get_submodule(n) for n in load_routed(tmp_path / "r").modules}
    attach(m, load_routed(tmp_path / "r"))
    with torch.no_grad():
        m(**inputs_for("gpt2"))
    detach(m)
    assert all(m.get_submodule(n) is mod for n, mod in originals.items())
    assert torch.equal(outputs(m, "gpt2"), before)


def test_route_takes_one_request(tmp_path):
    """route(sources, out, params, weights, calibration, options): the method's Params, not 21 keywords."""
    import inspect as pyinspect

    from mergekit_lora.routing import Calibration

    assert list(pyinspect.signature(route).parameters) == ["sources", "out", "params", "weights", "calibration",
                                                           "options"]
    a = make_peft_adapter(tmp_path / "a", seed=1)
    with pytest.raises(LoraMergeError, match="pass «calibrate_data» and «base»|pass calibrate_data and base"):
        route([a], tmp_path / "r", {"top_k": 1}, calibration=Calibration(export_static=True))
    with pytest.raises(LoraMergeError, match="hierarchical router"):
        route([a], tmp_path / "r", {"top_k": 1}, calibration=Calibration(base=tmp_path, profiles=["p.jsonl"]))
    res = route([a], tmp_path / "r", {"top_k": 1, "router": "hierarchical", "evidence": "module"})
    assert json.loads((res.out / "routing_config.json").read_text())["router"] == "hierarchical"


def test_route_default_top_k_is_half_the_largest_input_rank(tmp_path):
    """The default chosen on the suite's selection scenarios (evals/RESULTS.md, suite v3): k = r/2."""
    a, b = two_adapters(tmp_path)
    r = CliRunner().invoke(app, ["route", str(a), str(b), "-o", str(tmp_path / "routed")])
    assert r.exit_code == 0, r.output
    routed = load_routed(tmp_path / "routed")
    ins = [load_adapter(a), load_adapter(b)]
    for name, m in routed.modules.items():  # per module: half the largest rank among the inputs that have it
        r = max(x.units(name).rank for x in ins if name in x.module_names())
        assert m.top_k == max(1, r // 2), name
    assert {m.top_k for m in routed.modules.values()} == {2, 3}  # r = 4 alone, r = 4 and 6 together
