"""Domain profiles in the adapter library: the router's statistics, exact scores, retrieval, incremental, Ray, CLI.

A tiny Llama saved to a folder is the base model; example files hold token ids (no tokenizer needed).  Two
"domains" use disjoint halves of the vocabulary, so their inputs differ at every layer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import VOCAB, make_peft_adapter, tiny_llama
from ray_fixtures import ray_session  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.library import compose, index_sources, search_examples
from mergekit_lora.library.profile import Profiler
from mergekit_lora.library.store import PROFILE_INDEX, Library
from mergekit_lora.pipeline import MergeRequest, execute, plan
from mergekit_lora.routing import RoutedAdapter
from mergekit_lora.routing.calibrate import load_examples, make_batches
from mergekit_lora.routing.hierarchical import gaussian_loglik
from mergekit_lora.routing.profile import fit_profiles
from mergekit_lora.routing.runtime import attach, detach

LOW, HIGH = range(3, VOCAB // 2), range(VOCAB // 2, VOCAB)


def write_examples(p: Path, vocab: range, n: int, seed: int) -> Path:
    rnd = random.Random(seed)
    p.write_text("".join(json.dumps({"input_ids": [rnd.choice(vocab) for _ in range(rnd.randint(5, 12))]}) + "\n"
                         for _ in range(n)))
    return p


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Path]:
    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(str(base))
    w = {"base": base, "pool": tmp_path / "pool"}
    for name, seed in (("low", 1), ("high", 2), ("other", 3)):
        w[name] = make_peft_adapter(w["pool"] / name, seed=seed)
    w["low.jsonl"] = write_examples(tmp_path / "low.jsonl", LOW, 12, 0)
    w["high.jsonl"] = write_examples(tmp_path / "high.jsonl", HIGH, 12, 1)
    w["q-low.jsonl"] = write_examples(tmp_path / "q-low.jsonl", LOW, 6, 10)
    w["q-high.jsonl"] = write_examples(tmp_path / "q-high.jsonl", HIGH, 6, 11)
    return w


def _index(w: dict[str, Path], lib: Path, **kw):  # noqa: ANN202
    return index_sources([str(w["pool"])], lib, base=str(w["base"]),
                         examples={str(w["low"]): w["low.jsonl"], str(w["high"]): w["high.jsonl"]}, **kw)


def _unpack(vec: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = vec[:d].astype(np.float64), vec[d:2 * d].astype(np.float64)
    var = -1.0 / (2 * b)
    return a * var, var


def test_profile_equals_the_hierarchical_routers_base_profile(world: dict[str, Path], tmp_path: Path) -> None:
    """μ and the floored σ² stored for an adapter are fit_profiles(through="base") at the profiled module."""
    lib = tmp_path / "lib"
    _index(world, lib)
    db = Library.open(lib)
    meta = db.profile_meta()
    ids, vecs = db.vectors("profile")
    src = {r["id"]: r["source"] for r in db.rows()}
    db.close()
    assert meta["modules"] == ["model.layers.0.self_attn.q_proj"] and meta["dims"] == [32]
    vec = vecs[[src[int(i)] for i in ids].index(str(world["low"]))]
    mu, var = _unpack(vec, 32)

    model = tiny_llama(0)
    p = plan(MergeRequest(sources=[str(world["low"])], method="route", params={"router": "hierarchical", "top_k": 1}))
    routed = RoutedAdapter(execute(p).merged or {}, p.base_model, list(p.labels))
    handle = attach(model, routed)
    try:
        batches = make_batches(load_examples(world["low.jsonl"]), 8)
        fitted = fit_profiles(model, handle, [batches], through="base")
    finally:
        detach(model)
    want_mu, want_var = fitted[meta["modules"][0]]
    assert np.allclose(mu, want_mu[0].numpy(), rtol=1e-4, atol=1e-5)
    assert np.allclose(var, want_var[0].numpy(), rtol=1e-4, atol=1e-6)


def test_search_by_examples_ranks_the_right_domain_with_the_exact_statistic(world: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    r = _index(world, lib)
    assert r.total == 3 and sorted(Path(s).name for s in r.profiled) == ["high", "low"]
    prof = Profiler(world["base"])
    for query, want in (("q-low.jsonl", "low"), ("q-high.jsonl", "high")):
        hits = search_examples(lib, world[query], top_m=5, profiler=prof, rerank="none")
        assert [Path(h["source"]).name for h in hits][0] == want and len(hits) == 2  # "other" has no profile
        assert hits[0]["score"] > hits[1]["score"] and hits[0]["statistic"] == "profile"
        assert "log-likelihood" in hits[0]["why"] and "q_proj" in hits[0]["why"]
    # the score is the mean over the query's real tokens of ℓ_s(x) at the profiled module (one module here)
    db = Library.open(lib)
    ids, vecs = db.vectors("profile")
    src = {r["id"]: r["source"] for r in db.rows()}
    db.close()
    mu, var = _unpack(vecs[[src[int(i)] for i in ids].index(str(world["high"]))], 32)
    xs = []
    h = prof.model.get_submodule("model.layers.0.self_attn.q_proj").register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    for b in make_batches(load_examples(world["q-low.jsonl"]), 8):
        with torch.no_grad():
            prof.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        xs[-1] = xs[-1][b.attention_mask.reshape(-1).bool()]
    h.remove()
    ll = gaussian_loglik(torch.cat(xs).double(), torch.tensor(mu)[None], torch.tensor(var)[None])
    hits = search_examples(lib, world["q-low.jsonl"], top_m=2, profiler=prof, rerank="none")
    got = next(x["score"] for x in hits if x["source"] == str(world["high"]))
    assert abs(got - float(ll.mean())) < 1e-3 * abs(float(ll.mean()))


def test_profiles_incremental_and_removed(world: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    lib = tmp_path / "lib"
    _index(world, lib)
    r = _index(world, lib)
    assert r.profiled == [] and r.unchanged == 3  # same examples: nothing recomputed
    write_examples(world["low.jsonl"], HIGH, 12, 5)  # changed examples: that profile is refitted
    r = _index(world, lib)
    assert [Path(s).name for s in r.profiled] == ["low"]
    shutil.rmtree(world["high"])
    r = index_sources([str(world["pool"])], lib)  # no --examples: the library's base is kept, nothing profiled
    db = Library.open(lib)
    assert [Path(s).name for s in db.profiles()] == ["low"] and len(db.vectors("profile")[0]) == 1
    db.close()
    (lib / PROFILE_INDEX).unlink()
    lines: list[str] = []
    assert len(search_examples(lib, world["q-low.jsonl"], say=lines.append)) == 1
    assert len(lines) == 1 and "profiles.faiss was missing" in lines[0]


def test_ray_profiles_equal_local(world: dict[str, Path], tmp_path: Path, ray_session) -> None:  # noqa: F811
    _index(world, tmp_path / "local")
    r = _index(world, tmp_path / "ray", ray_workers=2)
    assert len(r.profiled) == 2
    got = [Library.open(tmp_path / x).vectors("profile")[1] for x in ("local", "ray")]
    assert np.array_equal(got[0], got[1])


def test_compose_by_examples_and_cli(world: dict[str, Path], tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    _index(world, lib)
    res, hits = compose(lib, "linear", tmp_path / "out", examples=world["q-high.jsonl"], top_m=1, rerank="none")
    assert [Path(h["source"]).name for h in hits] == ["high"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Library query" in card and "domain profile" in card and "q-high.jsonl" in card
    runner = CliRunner()
    r = runner.invoke(app, ["library", "search", str(lib), "--examples", str(world["q-low.jsonl"]), "--json",
                            "--rerank", "none"])
    assert r.exit_code == 0, r.output
    assert Path(json.loads(r.stdout)[0]["source"]).name == "low"
    r = runner.invoke(app, ["library", "compose", str(lib), "--examples", str(world["q-low.jsonl"]), "-m", "route",
                            "--top-m", "2", "-o", str(tmp_path / "routed")])
    assert r.exit_code == 0, r.output
    bad = [
        ["library", "index", str(world["pool"]), "-o", str(tmp_path / "new"), "--examples",
         f"{world['low']}={world['low.jsonl']}"],  # no --base for a new library
        ["library", "index", str(world["pool"]), "-o", str(lib), "--examples", f"{tmp_path}={world['low.jsonl']}"],
        ["library", "index", str(world["pool"]), "-o", str(lib), "--examples", "no-equals-sign"],
        ["library", "index", str(world["pool"]), "-o", str(lib), "--examples", f"{world['low']}={tmp_path / 'x.jsonl'}"],
        ["library", "search", str(lib), "--examples", str(world["q-low.jsonl"]), "--like", str(world["low"])],
        ["library", "search", str(lib)],
        ["library", "search", str(lib), "--examples", str(tmp_path / "missing.jsonl")],
    ]
    index_sources([str(world["pool"])], tmp_path / "plain")
    bad.append(["library", "search", str(tmp_path / "plain"), "--examples", str(world["q-low.jsonl"])])
    for args in bad:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)
    assert not (tmp_path / "new").exists()
