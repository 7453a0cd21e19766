"""Two-stage library retrieval: the profile shortlist reranked by each adapter's behaviour on the query.

Two LoRAs trained on the *same* inputs (so their domain profiles are identical) — one on the real labels, one on
shuffled labels — and one untrained random LoRA: the behaviour statistics must put the trained one first.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, make_peft_adapter, tiny_llama
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.library import compose, index_sources, search_examples
from mergekit_lora.library.profile import Profiler
from mergekit_lora.library.rerank import behaviour_score, rerank_scores

LABELS = (5, 6)  # the answer tokens
INPUTS = range(10, VOCAB)


def rows(n: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.choice(INPUTS) for _ in range(rnd.randint(4, 8))] for _ in range(n)]


def label(ids: list[int]) -> int:
    return LABELS[int(ids[-1] >= (INPUTS.start + INPUTS.stop) // 2)]


def base_model() -> torch.nn.Module:
    """The tiny Llama with a 30× LM head: its random init's logits are otherwise too small for any adapter of
    the attention to make an answer decisive."""
    m = tiny_llama(0)
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)
    return m


def train_lora(out: Path, data: list[list[int]], labels: list[int], steps: int = 150) -> Path:
    """A rank-4 q/v/o LoRA trained to answer ``labels[i]`` after ``data[i]`` (full batch, Adam)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    T = max(map(len, data))
    ids = torch.zeros(len(data), T, dtype=torch.long)
    att = torch.zeros(len(data), T, dtype=torch.long)
    for i, r in enumerate(data):
        ids[i, :len(r)], att[i, :len(r)] = torch.tensor(r), 1
    last, y = att.sum(1) - 1, torch.tensor(labels)
    pm.train()
    for _ in range(steps):
        logits = pm(input_ids=ids, attention_mask=att).logits[torch.arange(len(data)), last]
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(str(out))
    return out


def write(p: Path, data: list[list[int]]) -> Path:
    p.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in data))
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("rerank")
    base = tmp / "base"
    base_model().save_pretrained(str(base))
    train = rows(64, 0)
    shuffled = [label(r) for r in train]
    random.Random(1).shuffle(shuffled)
    w = {"base": base, "pool": tmp / "pool"}
    w["trained"] = train_lora(w["pool"] / "trained", train, [label(r) for r in train])
    w["shuffled"] = train_lora(w["pool"] / "shuffled", train, shuffled)
    w["random"] = make_peft_adapter(w["pool"] / "random", seed=3, scale_b=0.3)
    w["profile.jsonl"] = write(tmp / "profile.jsonl", train[:16])
    w["query.jsonl"] = write(tmp / "query.jsonl", rows(16, 7))
    w["lib"] = tmp / "lib"
    index_sources([str(w["pool"])], w["lib"], base=str(base),
                  examples={str(w[n]): w["profile.jsonl"] for n in ("trained", "shuffled", "random")})
    return w


def test_behaviour_statistics_exact() -> None:
    V = 7
    uniform = torch.full((3, V), 1.0 / V, dtype=torch.float64)
    assert math.isclose(behaviour_score(uniform, "confidence"), -math.log(V), rel_tol=1e-12)
    assert abs(behaviour_score(uniform, "infomax")) < 1e-12  # the same answer for every example
    onehot = torch.eye(V, dtype=torch.float64)[:4]  # decisive and different per example
    assert abs(behaviour_score(onehot, "confidence")) < 1e-12
    assert math.isclose(behaviour_score(onehot, "infomax"), math.log(4), rel_tol=1e-12)
    same = torch.eye(V, dtype=torch.float64)[[2, 2, 2]]  # decisive, always the same token: no information
    assert abs(behaviour_score(same, "infomax")) < 1e-12 and abs(behaviour_score(same, "confidence")) < 1e-12


def test_rerank_puts_the_trained_adapter_above_shuffled_labels_and_random(world: dict[str, Path]) -> None:
    prof = Profiler(world["base"])
    plain = search_examples(world["lib"], world["query.jsonl"], top_m=3, profiler=prof, rerank="none")
    # identical profiles: the input statistics cannot tell the three apart
    assert len({h["profile_score"] for h in plain}) == 1 and plain[0]["statistic"] == "profile"
    for stat in ("confidence", "infomax"):
        hits = search_examples(world["lib"], world["query.jsonl"], top_m=3, profiler=prof, rerank=stat)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
        assert hits[0]["statistic"] == f"profile+{stat}" and stat in hits[0]["why"]
        if stat == "confidence":  # trained > shuffled labels > random (infomax: see the last assertion)
            assert [Path(h["source"]).name for h in hits] == ["trained", "shuffled", "random"], hits
        # the score is the statistic of the candidate attached on its own
        want = rerank_scores(prof.model, prof.base, [h["source"] for h in hits], world["query.jsonl"], stat)
        assert all(abs(h["score"] - v) < 1e-5 for h, v in zip(hits, want))
    # the trained adapter answers decisively (its entropy far below the shuffled one's ≈ ln 2)
    conf = rerank_scores(prof.model, prof.base, [str(world["trained"]), str(world["shuffled"])],
                         world["query.jsonl"], "confidence")
    assert conf[0] > -0.35 and conf[1] < -0.5, conf
    # infomax rewards input-dependent answers of any kind: the untrained random adapter's varied, flat
    # next-token distributions score above the trained adapter's decisive two-label answers
    info = rerank_scores(prof.model, prof.base, [str(world["trained"]), str(world["random"])],
                         world["query.jsonl"], "infomax")
    assert info[1] > info[0], info
    # detaching restores the base: the profile stage gives the same scores afterwards
    again = search_examples(world["lib"], world["query.jsonl"], top_m=3, profiler=prof, rerank="none")
    assert [h["profile_score"] for h in again] == [h["profile_score"] for h in plain]


def test_shortlist_limits_the_rerank_and_compose_records_it(world: dict[str, Path], tmp_path: Path) -> None:
    prof = Profiler(world["base"])
    plain = search_examples(world["lib"], world["query.jsonl"], top_m=1, profiler=prof, rerank="none")
    one = search_examples(world["lib"], world["query.jsonl"], top_m=1, profiler=prof, rerank="confidence",
                          shortlist=1)
    assert one[0]["source"] == plain[0]["source"]  # a shortlist of 1 is the profile's own top hit
    res, hits = compose(world["lib"], "linear", tmp_path / "out", examples=world["query.jsonl"], top_m=1,
                        rerank="confidence", base=world["base"])
    assert [Path(h["source"]).name for h in hits] == ["trained"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "reranked by confidence" in card and "profile score" in card
    runner = CliRunner()
    r = runner.invoke(app, ["library", "search", str(world["lib"]), "--examples", str(world["query.jsonl"]),
                            "--rerank", "confidence", "--json"])
    assert r.exit_code == 0, r.output
    assert Path(json.loads(r.stdout)[0]["source"]).name == "trained"
    query = ["--examples", str(world["query.jsonl"])]
    for bad in ([*query, "--rerank", "loudest"], [*query, "--shortlist", "0"],
                ["--like", str(world["trained"]), "--rerank", "confidence"]):
        r = runner.invoke(app, ["library", "search", str(world["lib"]), *bad])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
