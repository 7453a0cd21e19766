"""Runtime: attach/detach on tiny transformers models vs a per-token reference loop."""

import pytest
import torch
from helpers import inputs_for, make_peft_adapter, outputs, rel, tiny_gpt2, tiny_llama
from torch import nn

from mergekit_lora import LoraMergeError, merge
from mergekit_lora.formats.routed import RoutedUnits
from mergekit_lora.routing import load_routed
from mergekit_lora.routing.runtime import RoutedLoraLayer, attach, detach
from mergekit_lora.units import RankUnits

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def reference_delta(ru: RoutedUnits, k: int, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, plain Python: score, sort, sum the chosen units."""
    A, B = ru.units.A.double(), ru.units.B.double()
    bias = ru.bias_or_zeros().double()
    rows = []
    for h in x.reshape(-1, x.shape[-1]).double():
        y = A @ h
        if ru.router == "implicit":
            s = [abs(float(y[i])) * float(B[:, i].norm()) for i in range(len(y))]
            mean = sum(s) / len(s)
            score = [si / mean + float(bias[i]) for i, si in enumerate(s)]
            chosen = sorted(range(len(y)), key=lambda i: -score[i])[:k]
            wts = {i: 1.0 for i in chosen}
        else:
            G = ru.gate.double()
            logit = [abs(float(G[i] @ h)) / float(h.norm()) for i in range(len(y))]
            chosen = sorted(range(len(y)), key=lambda i: -(logit[i] + float(bias[i])))[:k]
            e = [torch.exp(torch.tensor(logit[i] / ru.temperature)) for i in chosen]
            wts = {i: k * float(ei / sum(e)) for i, ei in zip(chosen, e)}
        rows.append(sum(wts[i] * float(y[i]) * B[:, i] for i in chosen))
    return torch.stack(rows).reshape(*x.shape[:-1], B.shape[0])


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("router", ["implicit", "gate"])
@pytest.mark.parametrize("fuse,sparse", [(True, None), (False, True), (True, True), (False, False)])
def test_attach_matches_reference_loop_and_detach_is_exact(tmp_path, model, router, fuse, sparse):
    """Every execution path (fused sibling projections or not, dense or gathered B) equals the loop."""
    a = make_peft_adapter(tmp_path / "a", model, seed=1, target_modules=TARGETS[model])
    b = make_peft_adapter(tmp_path / "b", model, seed=2, r=3, target_modules=TARGETS[model][:1])
    merge([a, b], "route", tmp_path / "r", params={"top_k": 3, "router": router, "temperature": 0.5})
    routed = load_routed(tmp_path / "r")
    g = torch.Generator().manual_seed(5)
    for ru in routed.modules.values():  # a non-zero selection bias exercises d too
        ru.bias.copy_(torch.rand(ru.rank, generator=g) * 0.3)
    m = BUILD[model](0)
    before = outputs(m, model)
    # the reference: forward hooks on the untouched modules add the loop-computed routed update
    hooks = []
    for name, ru in routed.modules.items():
        def hook(mod, inp, out, ru=ru):
            return out + reference_delta(ru, ru.top_k, inp[0]).to(out.dtype)
        hooks.append(m.get_submodule(name).register_forward_hook(hook))
    want = outputs(m, model)
    for h in hooks:
        h.remove()
    handle = attach(m, routed, fuse=fuse)
    for layer in handle.layers.values():
        layer.sparse = sparse
    if fuse and model == "llama":  # q_proj and v_proj read the same input: one projection
        q = handle.layers["model.layers.0.self_attn.q_proj"]
        assert q.group is not None and q.group is handle.layers["model.layers.0.self_attn.v_proj"].group
    assert len(handle.layers) == len(routed.modules)
    assert all(isinstance(m.get_submodule(n), RoutedLoraLayer) for n in routed.modules)
    got = outputs(m, model)
    assert rel(got, want) < 1e-5
    assert rel(got, before) > 1e-3  # the routed update really changes the output
    with torch.inference_mode():  # what the evaluation harness runs under (inference tensors, no versions)
        assert rel(outputs(m, model), want) < 1e-5
    assert detach(m) == len(routed.modules)
    assert torch.equal(outputs(m, model), before)  # bit-identical after detach
    assert not any(isinstance(x, RoutedLoraLayer) for x in m.modules())


def test_top_k_override_and_autograd(tmp_path):
    a = make_peft_adapter(tmp_path / "a", seed=1)
    merge([a], "route", tmp_path / "r", params={"top_k": 4, "router": "gate"})
    routed = load_routed(tmp_path / "r")
    m = tiny_llama(0)
    name = "model.layers.0.self_attn.q_proj"
    handle = attach(m, routed, top_k={name: 1})
    assert handle.layers[name].top_k == 1 and handle.layers["model.layers.1.self_attn.q_proj"].top_k == 4
    out = m(**inputs_for("llama")).logits.sum()
    out.backward()
    assert handle.layers["model.layers.1.self_attn.q_proj"].gate.grad.abs().sum() > 0
    detach(m)


def test_attach_errors(tmp_path):
    a = make_peft_adapter(tmp_path / "a", seed=1)
    merge([a], "route", tmp_path / "r", params={"top_k": 2})
    routed = load_routed(tmp_path / "r")
    with pytest.raises(LoraMergeError, match="has no module"):
        attach(tiny_gpt2(0), routed)
    with pytest.raises(LoraMergeError, match="outside 1..4"):
        attach(tiny_llama(0), routed, top_k=9)
    from helpers import peft_model

    with pytest.raises(LoraMergeError, match="PEFT LoRA layer"):
        attach(peft_model(a), routed)
    wrong = {"lin": RoutedUnits(RankUnits.from_factors(torch.ones(1, 3), torch.ones(2, 1)), "implicit", 1)}
    with pytest.raises(LoraMergeError, match="wrong base model"):
        attach(nn.ModuleDict({"lin": nn.Linear(4, 2)}), wrong)
    m = tiny_llama(0)
    attach(m, routed)
    with pytest.raises(LoraMergeError, match="already has a routed adapter"):
        attach(m, routed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attach_on_cuda_matches_cpu(tmp_path):
    a = make_peft_adapter(tmp_path / "a", seed=1)
    merge([a], "route", tmp_path / "r", params={"top_k": 2, "router": "gate"})
    routed = load_routed(tmp_path / "r")
    cpu = tiny_llama(0)
    attach(cpu, routed)
    gpu = tiny_llama(0).cuda()
    attach(gpu, routed)
    x = inputs_for("llama")
    with torch.no_grad():
        want = cpu(**x).logits
        got = gpu(**{k: v.cuda() for k, v in x.items()}).logits.cpu()
    assert rel(got, want) < 1e-4


def test_public_runtime_name_is_the_routing_runtime():
    """Routed model cards print ``from mergekit_lora.runtime import attach``: the alias stays."""
    import mergekit_lora.routing as routing
    import mergekit_lora.runtime as public
    from mergekit_lora.routing import runtime

    assert public.attach is runtime.attach is routing.attach
    assert public.detach is runtime.detach is routing.detach
    assert routing.RoutedUnits is RoutedUnits
