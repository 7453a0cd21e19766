"""The task harness on a tiny random Llama (token-id-level examples): scores, padding, attach/detach."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, make_peft_adapter, tiny_llama
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.evals.tasks import (
    EncodedTask,
    adapter_kind,
    attached,
    normalized_accuracy,
    pad_left,
    score,
)

LABELS = torch.tensor([5, 17, 42])


def _task(seed: int = 0, n: int = 10) -> EncodedTask:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    gold = torch.randint(0, 3, (n,), generator=g)
    return EncodedTask("toy", ids, gold, LABELS)


def _by_hand(model, task: EncodedTask) -> tuple[float, float]:
    """One unpadded forward per example: argmax over the label tokens, CE of the gold label token."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for ids, g in zip(task.ids, task.gold):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            correct += int(int(logits[LABELS].argmax()) == int(g))
            loss += float(-torch.log_softmax(logits, 0)[LABELS[g]])
    return correct / len(task), loss / len(task)


def test_pad_left_layout():
    ids, mask, pos = pad_left([[7, 8, 9], [4]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_score_equals_hand_computed(batch_size):
    model = tiny_llama(0)
    task = _task()
    acc, loss = _by_hand(model, task)
    s = score(model, task, batch_size=batch_size)
    assert s.n == 10
    assert s.accuracy == acc
    assert s.loss == pytest.approx(loss, rel=1e-5)


def test_accuracy_on_a_fixed_batch_is_the_counted_value():
    """Gold labels set to the model's own predictions on 7 of 10 examples -> accuracy exactly 0.7."""
    model = tiny_llama(0)
    task = _task(seed=3)
    with torch.no_grad():
        preds = [int(model(input_ids=torch.tensor([ids])).logits[0, -1][LABELS].argmax()) for ids in task.ids]
    gold = torch.tensor([p if i < 7 else (p + 1) % 3 for i, p in enumerate(preds)])
    s = score(model, EncodedTask("toy", task.ids, gold, LABELS), batch_size=3)
    assert s.accuracy == pytest.approx(0.7, abs=1e-12)


def test_attach_detach_leaves_base_unchanged(tmp_path):
    model = tiny_llama(0)
    path = make_peft_adapter(tmp_path / "a", seed=5, scale_b=0.5)
    x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
        with attached(model, path) as m:
            during = m(input_ids=x).logits.clone()
        after = model(input_ids=x).logits
    assert torch.equal(before, after)
    assert (during - before).abs().max() > 1e-3  # the adapter really was active
    assert not any("lora" in n for n, _ in model.named_modules())
    task = _task()
    with attached(model, path) as m:
        with_adapter = score(m, task)
    assert score(model, task).loss == pytest.approx(_by_hand(model, task)[1], rel=1e-5)
    assert with_adapter.loss != pytest.approx(score(model, task).loss, rel=1e-6)


def test_unknown_adapter_kind_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(LoraMergeError, match="no registered runtime"):
        adapter_kind(tmp_path / "x")
    with pytest.raises(LoraMergeError, match="no such adapter"):
        attached(tiny_llama(0), tmp_path / "nope")


def test_normalized_accuracy():
    m = {"ta": {"a": {"accuracy": 0.8}, "b": {"accuracy": 0.5}},
         "tb": {"a": {"accuracy": 0.4}, "b": {"accuracy": 1.0}},
         "merged": {"a": {"accuracy": 0.4}, "b": {"accuracy": 0.75}}}
    assert normalized_accuracy(m, "merged", {"a": "ta", "b": "tb"}) == pytest.approx((0.5 + 0.75) / 2)
    assert normalized_accuracy(m, "ta", {"a": "ta", "b": "tb"}) == pytest.approx((1 + 0.5) / 2)
    assert normalized_accuracy(m, "merged", {}) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda_is_a_clear_error():
    r = CliRunner().invoke(app, ["eval", "tasks", "--base", "smollm2-135m", "--device", "cuda"])
    assert r.exit_code == 2 and "CUDA is not available" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_match_cpu():
    model = tiny_llama(0)
    task = _task(n=24)
    cpu = score(model, task, batch_size=8)
    gpu = score(model.to("cuda"), task, batch_size=8, device=torch.device("cuda"))
    assert gpu.accuracy == cpu.accuracy
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-4)


def test_routed_adapters_attach_through_the_harness(tmp_path):
    """A `route` output (top-k = all units) evaluates like the `cat` merge in PEFT; detach restores the base."""
    from helpers import peft_model

    from mergekit_lora import merge

    a = make_peft_adapter(tmp_path / "a", seed=5, scale_b=0.3)
    b = make_peft_adapter(tmp_path / "b", seed=6, scale_b=0.3, r=2)
    merge([a, b], "route", tmp_path / "routed", params={"top_k": 6}, device="cpu")
    merge([a, b], "cat", tmp_path / "cat", device="cpu", weights=[1.0, 1.0])
    assert adapter_kind(tmp_path / "routed") == "routed"
    model = tiny_llama(0)
    x = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=x).logits.clone()
        with attached(model, tmp_path / "routed") as m:
            routed = m(input_ids=x).logits.clone()
        after = model(input_ids=x).logits
        cat = peft_model(tmp_path / "cat")(input_ids=x).logits
    assert torch.equal(before, after)
    assert float((routed - cat).norm() / cat.norm()) < 1e-5
    assert float((routed - before).abs().max()) > 1e-3
