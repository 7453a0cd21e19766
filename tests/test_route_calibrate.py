"""Calibration on a tiny synthetic two-task problem: each real (PEFT-trained) LoRA solves one task."""

import json

import torch
from helpers import make_peft_adapter, rel, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.routing import load_routed, route
from mergekit_lora.routing.calibrate import calibrate, lm_loss, make_batches
from mergekit_lora.routing.runtime import attach, detach


def task_rows(task: int, n: int, seed: int, T: int = 12) -> list[tuple[list[int], list[int]]]:
    """Task 0: counting by 1 in tokens 0..47; task 1: counting by 5 in tokens 48..95."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        s = int(torch.randint(0, 48, (1,), generator=g))
        seq = [(s + i) % 48 for i in range(T)] if task == 0 else [48 + (s + 5 * i) % 48 for i in range(T)]
        rows.append((seq, seq))
    return rows


def train_lora(task: int, out, steps: int = 120):
    torch.manual_seed(task + 1)
    pm = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj",
                                                                                      "down_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    batches = make_batches(task_rows(task, 128, 10 + task), 16)
    pm.train()
    for s in range(steps):
        b = batches[s % len(batches)]
        loss = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval().save_pretrained(str(out))
    return pm


def test_gate_calibration_reduces_task_loss(tmp_path):
    pms = [train_lora(t, tmp_path / f"lora{t}") for t in (0, 1)]
    evals = [make_batches(task_rows(t, 32, 100 + t), 16) for t in (0, 1)]
    base_loss = [lm_loss(tiny_llama(0), e) for e in evals]
    own = [lm_loss(pms[t], evals[t]) for t in (0, 1)]
    assert all(o < b - 0.3 for o, b in zip(own, base_loss))  # each LoRA really solves its task
    mixed = task_rows(0, 48, 200) + task_rows(1, 48, 201)
    route([tmp_path / "lora0", tmp_path / "lora1"], tmp_path / "routed", {"top_k": 2, "router": "gate"})
    model = tiny_llama(0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    units_before = load_routed(tmp_path / "routed")
    handle = attach(model, units_before)
    before = [lm_loss(model, e) for e in evals]
    res = calibrate(model, handle, make_batches(mixed, 16), steps=100, lr=5e-2, seed=0)
    after = [lm_loss(model, e) for e in evals]
    assert res.loss_after < res.loss_before - 0.1, (res.loss_before, res.loss_after)
    assert all(a < b - 0.1 for a, b in zip(after, before)), (before, after)  # both tasks gain on held-out data
    fitted = handle.routed(units_before)
    detach(model)
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())  # base model never moved
    for n, m in fitted.modules.items():  # units frozen, the gate moved
        assert torch.equal(m.units.A, units_before.modules[n].units.A)
        assert torch.equal(m.units.B, units_before.modules[n].units.B)
    assert any(not torch.equal(m.gate, units_before.modules[n].gate) for n, m in fitted.modules.items())


def test_route_cli_calibrate_and_export_static(tmp_path):
    """End to end: JSONL token ids + a transformers base folder -> calibrated routed adapter + PEFT static."""
    a = make_peft_adapter(tmp_path / "a", seed=1)
    b = make_peft_adapter(tmp_path / "b", seed=2, target_modules=["q_proj", "o_proj"])
    tiny_llama(0).save_pretrained(str(tmp_path / "base"))
    rows = task_rows(0, 8, 1) + task_rows(1, 8, 2)
    (tmp_path / "cal.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r, _ in rows))
    args = [str(a), str(b), "--router", "gate", "--top-k", "3", "--calibrate", str(tmp_path / "cal.jsonl"),
            "--base", str(tmp_path / "base"), "--steps", "5", "--export-static", "-o", str(tmp_path / "out")]
    res = CliRunner().invoke(app, ["route", *args])
    assert res.exit_code == 0, res.output
    routed = load_routed(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "routing_config.json").read_text())
    assert cfg["calibrated"] is True and cfg["router"] == "gate"
    assert cfg["sources"] == [str(a), str(b)] and cfg["calibration"]["steps"] == 5
    card = (tmp_path / "out" / "README.md").read_text()  # written by pipeline/output.py, as every output
    assert "## Calibration" in card and "## Static export" in card and "library_name: mergekit-lora" in card
    assert not list(tmp_path.glob(".out*")) and not list(tmp_path.glob("*.tmp*"))  # no temp folder left
    for m in routed.modules.values():
        assert m.activation is not None
        assert abs(float(m.activation.sum()) - m.top_k) < 1e-3  # k gate weights of mean 1 per token
    # the static export is a plain PEFT adapter holding Σ E[wᵢ mᵢ] bᵢ aᵢᵀ
    pm = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "out" / "static")).eval()
    name = "model.layers.0.self_attn.q_proj"
    m = routed.modules[name]
    want = (m.units.B * m.activation[None, :]) @ m.units.A
    got = pm.get_submodule(f"base_model.model.{name}")
    delta = got.lora_B["default"].weight @ got.lora_A["default"].weight * got.scaling["default"]
    assert rel(delta.detach(), want) < 1e-6
