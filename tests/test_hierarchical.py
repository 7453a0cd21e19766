"""Hierarchical router: a per-token reference loop, a planted two-domain problem, the routed file."""

import pytest
import torch
from helpers import make_peft_adapter, rel, tiny_llama

from mergekit_lora import LoraMergeError, merge
from mergekit_lora.routing import load_routed, write_routed
from mergekit_lora.routing.calibrate import make_batches
from mergekit_lora.routing.profile import fit_profiles, select_adapter
from mergekit_lora.routing.runtime import attach, detach

TARGETS = ["q_proj", "v_proj", "o_proj"]
DOMAINS = [(3, 40), (50, 95)]  # disjoint token ranges: the two planted domains


def planted_llama():
    """tiny_llama(0) whose two token ranges have embeddings shifted apart along one direction."""
    m = tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    shift = torch.randn(m.config.hidden_size, generator=g)
    shift = 2.0 * shift / shift.norm() * m.model.embed_tokens.weight.norm(dim=1).mean()
    with torch.no_grad():
        for d, sign in ((0, -1.0), (1, 1.0)):
            lo, hi = DOMAINS[d]
            m.model.embed_tokens.weight[lo:hi] += sign * shift
    return m


def planted_peft(path):
    from peft import PeftModel

    return PeftModel.from_pretrained(planted_llama(), str(path)).eval()


def domain_batch(d: int, n: int, seed: int, seq: int = 9) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = DOMAINS[d]
    return [torch.randint(lo, hi, (seq - i % 3,), generator=g).tolist() for i in range(n)]


def left_padded(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture()
def two_domains(tmp_path):
    a = make_peft_adapter(tmp_path / "a", seed=1, target_modules=TARGETS)
    b = make_peft_adapter(tmp_path / "b", seed=2, target_modules=TARGETS)
    data = [make_batches([(r, r) for r in domain_batch(d, 8, seed=10 + d)], 4) for d in range(2)]
    return a, b, data


def profiled(tmp_path, a, b, data, **params):
    merge([a, b], "route", tmp_path / "r", params={"top_k": 4, "router": "hierarchical", **params})
    routed = load_routed(tmp_path / "r")
    m = planted_llama()
    handle = attach(m, routed)
    fit_profiles(m, handle, data)
    return m, handle, handle.routed(routed)


def test_planted_two_domains_pick_the_right_adapter_exactly(tmp_path, two_domains):
    a, b, data = two_domains
    m, handle, _ = profiled(tmp_path, a, b, data)  # top_m = 1, top_k = 4 = each adapter's rank
    for d, path in enumerate((a, b)):
        x = left_padded(domain_batch(d, 5, seed=100 + d))
        with torch.no_grad():
            got = m(**x).logits
            want = planted_peft(path)(**x).logits
        real = x["attention_mask"].bool()
        assert rel(got[real], want[real]) < 1e-5  # every module chose adapter d: exactly its LoRA
        assert select_adapter(m, handle, **x).tolist() == [d] * 5
    # both adapters (mass 1) with all 8 units = the cat merge; tested via the plain implicit router at k = R
    detach(m)


def test_mass_one_keeps_every_adapter_and_equals_cat(tmp_path, two_domains):
    a, b, data = two_domains
    m, handle, _ = profiled(tmp_path, a, b, data, mass=1.0, top_k=8)
    merge([a, b], "cat", tmp_path / "cat", weights=[1.0, 1.0])  # route keeps every unit at full strength
    x = left_padded(domain_batch(0, 3, seed=7))
    with torch.no_grad():
        got = m(**x).logits
        want = planted_peft(tmp_path / "cat")(**x).logits
    real = x["attention_mask"].bool()
    assert rel(got[real], want[real]) < 1e-5


def reference_hierarchical(m, routed, x, mask):
    """Forward hooks on the untouched modules, per token in Python: evidence, choice, implicit top-k."""
    S = 2
    state = {"ev": None}
    hooks = []
    names = [n for n, _ in m.named_modules() if n in routed.modules]
    for name in names:
        ru = routed.modules[name]

        def hook(mod, inp, out, ru=ru):
            h = inp[0].double()
            Bn, T, _ = h.shape
            mu, var = ru.profile_mean.double(), ru.profile_var.double()
            A, B = ru.units.A.double(), ru.units.B.double()
            ev = torch.zeros(Bn, T, S, dtype=torch.float64)
            delta = torch.zeros(Bn, T, B.shape[0], dtype=torch.float64)
            for i in range(Bn):
                acc, cnt = torch.zeros(S, dtype=torch.float64), 0
                for t in range(T):
                    if mask[i, t]:
                        ll = [-0.5 * float((((h[i, t] - mu[s]) ** 2) / var[s]).sum() + var[s].log().sum())
                              for s in range(S)]
                        acc, cnt = acc + torch.tensor(ll, dtype=torch.float64), cnt + 1
                    ev[i, t] = acc / max(cnt, 1)
            ev = ev if state["ev"] is None else state["ev"] + ev
            state["ev"] = ev
            for i in range(Bn):
                for t in range(T):
                    chosen = int(ev[i, t].argmax())
                    y = A @ h[i, t]
                    s_ = [abs(float(y[j])) * float(B[:, j].norm()) for j in range(len(y))]
                    mean = sum(s_) / len(s_)
                    cand = [j for j in range(len(y)) if int(ru.units.source[j]) == chosen]
                    top = sorted(cand, key=lambda j: -(s_[j] / mean))[:ru.top_k]
                    delta[i, t] = sum(float(y[j]) * B[:, j] for j in top)
            return out + delta.to(out.dtype)
        hooks.append(m.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        out = m(**x).logits
    for hk in hooks:
        hk.remove()
    return out


def test_runtime_matches_per_token_reference_loop(tmp_path, two_domains):
    a, b, data = two_domains
    m, handle, routed = profiled(tmp_path, a, b, data, top_k=2)  # k < rank: token-level choice matters
    rows = domain_batch(0, 2, seed=3) + domain_batch(1, 1, seed=4)
    rows[1] = rows[1][:4] + domain_batch(1, 1, seed=5)[0][:5]  # a sequence that switches domain midway
    x = left_padded(rows)
    with torch.no_grad():
        got = m(**x).logits
    detach(m)
    want = reference_hierarchical(m, routed, x, x["attention_mask"].bool())
    real = x["attention_mask"].bool()
    assert rel(got[real], want[real]) < 1e-5


def test_profiles_round_trip_and_errors(tmp_path, two_domains):
    a, b, data = two_domains
    m, handle, routed = profiled(tmp_path, a, b, data, top_m=1, evidence="module")
    out = tmp_path / "saved"
    out.mkdir()
    cfg = write_routed(out, routed.modules.items(), base_model=None, sources=["a", "b"])
    assert cfg["router"] == "hierarchical" and cfg["profiled"] and cfg["evidence"] == "module"
    back = load_routed(out)
    for n, ru in routed.modules.items():
        assert torch.equal(back.modules[n].profile_mean, ru.profile_mean)
        assert torch.equal(back.modules[n].profile_var, ru.profile_var)
        assert back.modules[n].evidence == "module"
    x = left_padded(domain_batch(1, 3, seed=9))
    with torch.no_grad():
        want = m(**x).logits
    detach(m)
    m2 = planted_llama()
    attach(m2, back)
    with torch.no_grad():
        assert torch.equal(m2(**x).logits, want)
    detach(m2)
    m3 = tiny_llama(0)
    h3 = attach(m3, load_routed(tmp_path / "r"))
    with pytest.raises(LoraMergeError, match="missing for input adapter"):
        fit_profiles(m3, h3, {0: data[0]})
    with pytest.raises(LoraMergeError, match="no profiles"):
        select_adapter(m3, h3, torch.ones(1, 3, dtype=torch.long))
    merge([a], "route", tmp_path / "imp", params={"top_k": 2})
    m4 = tiny_llama(0)
    with pytest.raises(LoraMergeError, match="hierarchical router"):
        fit_profiles(m4, attach(m4, load_routed(tmp_path / "imp")), data)


def test_choose_sources_top_m_and_mass():
    from mergekit_lora.routing.hierarchical import choose_sources

    ev = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]]))
    assert choose_sources(ev, top_m=1).tolist() == [[True, False, False], [False, False, True]]
    assert choose_sources(ev, top_m=2).tolist() == [[True, True, False], [False, True, True]]
    assert choose_sources(ev, mass=0.5).tolist() == [[True, False, False], [False, False, True]]
    assert choose_sources(ev, mass=0.85).tolist() == [[True, True, False], [False, True, True]]
    assert choose_sources(ev, mass=0.95).tolist() == [[True, True, True], [True, True, True]]
    assert choose_sources(ev, mass=1.0).all()


def test_profiles_through_the_base_model_differ_only_after_the_first_update(tmp_path, two_domains):
    """The first routed module's input comes before any update: the same profile either way; deeper ones
    see the chosen adapter's effect only when profiled through it."""
    a, b, data = two_domains
    merge([a, b], "route", tmp_path / "r", params={"top_k": 4, "router": "hierarchical"})
    m = planted_llama()
    handle = attach(m, load_routed(tmp_path / "r"))
    base = fit_profiles(m, handle, data, through="base")
    thru = fit_profiles(m, handle, data, through="adapter")
    first, deep = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert base[first][0].shape == (2, 32) and not torch.equal(base[first][0][0], base[first][0][1])
    assert rel(base[first][0], thru[first][0]) < 1e-6 and rel(base[first][1], thru[first][1]) < 1e-5
    assert rel(base[deep][0], thru[deep][0]) > 1e-2
    pooled = fit_profiles(m, handle, data, covariance="pooled")
    assert torch.equal(pooled[deep][1][0], pooled[deep][1][1]) and torch.equal(pooled[deep][0], thru[deep][0])
    with pytest.raises(ValueError, match="through"):
        fit_profiles(m, handle, data, through="nowhere")
