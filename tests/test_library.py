"""The adapter library: index, search, dedupe, incremental updates, index repair, compose, CLI errors.

Synthetic PEFT adapters (a few small modules) written directly with safetensors: fast, no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_lora.cli.main import app
from mergekit_lora.formats import load_adapter
from mergekit_lora.library import compose, dedupe, index_sources, search, signature, summary
from mergekit_lora.library.store import INDEX, Library
from mergekit_lora.pipeline import merge

MODULES = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
D = 24


def write_adapter(p: Path, seed: int, rank: int = 4, noise: float = 0.0, readme: str | None = None,
                  base: str = "tiny-base") -> Path:
    """A PEFT folder: seeded factors for MODULES; ``noise`` perturbs the factors of seed's adapter slightly."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in MODULES:
        tensors[f"{m}.lora_A.weight"] = torch.randn(rank, D, generator=g)
        tensors[f"{m}.lora_B.weight"] = torch.randn(D, rank, generator=g)
    if noise:
        h = torch.Generator().manual_seed(10_000 + seed)
        tensors = {k: v + noise * v.norm() / v.numel() ** 0.5 * torch.randn(v.shape, generator=h)
                   for k, v in tensors.items()}
    p.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p / "adapter_model.safetensors"))
    (p / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "base_model_name_or_path": base,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    if readme is not None:
        (p / "README.md").write_text(readme)
    return p


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    for s in range(5):
        write_adapter(root / f"a{s}", seed=s, readme=f"---\nlicense: mit\n---\n# Adapter {s}\ntext\n")
    write_adapter(root / "a0-copy", seed=0, noise=0.01)  # a near-duplicate of a0
    write_adapter(root / "nested" / "b", seed=7, rank=8)
    return root


def test_signature_invariant_to_unit_order_and_scale_split(tmp_path: Path) -> None:
    p = write_adapter(tmp_path / "x", seed=3)
    t = load_file(str(p / "adapter_model.safetensors"))
    perm = torch.tensor([2, 0, 3, 1])
    c = torch.tensor([2.0, 0.5, -1.0, 3.0])
    q = {}
    for k, v in t.items():
        if "lora_A" in k:
            q[k] = (v * c[:, None])[perm]
        else:
            q[k] = (v / c[None, :])[:, perm]
    y = tmp_path / "y"
    y.mkdir()
    save_file(q, str(y / "adapter_model.safetensors"))
    (y / "adapter_config.json").write_text((p / "adapter_config.json").read_text())
    a, na = signature(load_adapter(p))
    b, nb = signature(load_adapter(y))
    assert np.allclose(a, b, atol=1e-5) and abs(na - nb) < 1e-6 * na
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    cfg = json.loads((y / "adapter_config.json").read_text())
    (y / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 3 * cfg["r"]}))  # 3× the strength
    c3, n3 = signature(load_adapter(y))
    assert np.allclose(a, c3, atol=1e-5) and abs(n3 - 3 * na) < 1e-5 * na  # blind to strength; the norm records it


def test_index_search_dedupe_inspect(pool: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    r = index_sources([str(pool)], lib)
    assert r.total == 7 and len(r.added) == 7 and not r.skipped
    hits = search(lib, pool / "a0", top_m=3)
    assert [Path(h["source"]).name for h in hits[:2]] == ["a0", "a0-copy"]
    assert hits[0]["score"] > 0.9999 and 0.99 < hits[1]["score"] < hits[0]["score"]
    assert hits[2]["score"] < 0.5  # unrelated adapters are far
    assert hits[0]["card"] == "Adapter 0" and hits[1]["card"] is None
    pairs = dedupe(lib, 0.99)
    assert [{Path(p["a"]).name, Path(p["b"]).name} for p in pairs] == [{"a0", "a0-copy"}]
    s = summary(lib)
    assert s["adapters"] == 7 and s["formats"] == {"peft": 7} and s["ranks"] == {"4": 6, "8": 1}
    row = next(r for r in Library.open(lib).rows() if r["source"].endswith("/a1"))
    assert row["card"] == "Adapter 1" and row["base_model"] == "tiny-base" and row["target_modules"] == ["q_proj", "v_proj"]
    assert len(row["content_hash"]) == 40 and row["size_bytes"] > 0


def test_incremental_changed_removed_added(pool: Path, tmp_path: Path) -> None:
    import shutil

    lib = tmp_path / "lib"
    index_sources([str(pool)], lib)
    old = {r["source"]: r for r in Library.open(lib).rows()}
    r = index_sources([str(pool)], lib)
    assert r.unchanged == 7 and not r.added and not r.updated and not r.removed
    write_adapter(pool / "a1", seed=11)  # changed content
    shutil.rmtree(pool / "a2")  # gone
    write_adapter(pool / "new", seed=12)
    r = index_sources([str(pool)], lib)
    assert [Path(s).name for s in r.updated] == ["a1"] and [Path(s).name for s in r.removed] == ["a2"]
    assert [Path(s).name for s in r.added] == ["new"] and r.total == 7
    new = {r["source"]: r for r in Library.open(lib).rows()}
    a1 = str((pool / "a1").resolve())
    assert new[a1]["content_hash"] != old[a1]["content_hash"]
    assert search(lib, pool / "a1", top_m=1)[0]["source"] == a1


def test_corrupt_or_stale_index_is_rebuilt(pool: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    index_sources([str(pool)], lib)
    (lib / INDEX).write_bytes(b"not a faiss index")
    lines: list[str] = []
    hits = search(lib, pool / "a3", top_m=1, say=lines.append)
    assert Path(hits[0]["source"]).name == "a3"
    assert len(lines) == 1 and "unreadable" in lines[0] and "rebuilt" in lines[0]
    lines.clear()
    search(lib, pool / "a3", top_m=1, say=lines.append)
    assert lines == []  # the rebuilt file was written back
    db = Library.open(lib)  # a catalogue changed behind the index's back: stale
    db.db.execute("DELETE FROM adapters WHERE source LIKE '%/a4'")
    db.close()
    summary(lib, say=lines.append)
    assert len(lines) == 1 and "stale (7 vectors, the catalogue has 6 adapters)" in lines[0]


def test_compose_equals_merge_of_retrieved(pool: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    index_sources([str(pool)], lib)
    res, hits = compose(lib, "linear", tmp_path / "out", like=pool / "a0", top_m=2)
    assert [Path(h["source"]).name for h in hits] == ["a0", "a0-copy"]
    ref = merge([h["source"] for h in hits], "linear", tmp_path / "ref")
    got, want = load_adapter(tmp_path / "out"), load_adapter(ref.out)
    assert got.module_names() == want.module_names()
    for m in got.module_names():
        assert torch.equal(got.units(m).A, want.units(m).A) and torch.equal(got.units(m).B, want.units(m).B)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Library query" in card and "a0-copy" in card and "like `" in card


def test_cli_round_trip_and_errors(pool: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    lib = tmp_path / "lib"
    r = runner.invoke(app, ["library", "index", str(pool / "a*"), str(pool / "nested"), "-o", str(lib)])
    assert r.exit_code == 0, r.output
    assert "7 adapters" in r.stdout
    r = runner.invoke(app, ["library", "search", str(lib), "--like", str(pool / "a0"), "--top-m", "2", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert [Path(h["source"]).name for h in hits] == ["a0", "a0-copy"] and hits[0]["score"] >= hits[1]["score"]
    for args in (["library", "dedupe", str(lib)], ["library", "inspect", str(lib)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["library", "compose", str(lib), "--like", str(pool / "a0"), "-m", "route",
                            "--top-m", "2", "-o", str(tmp_path / "routed")])
    assert r.exit_code == 0, r.output
    assert "Library query" in (tmp_path / "routed" / "README.md").read_text()
    bad = [
        ["library", "search", str(tmp_path / "nolib"), "--like", str(pool / "a0")],
        ["library", "search", str(lib), "--like", str(tmp_path / "missing")],
        ["library", "search", str(lib), "--like", str(pool / "a0"), "--top-m", "0"],
        ["library", "dedupe", str(lib), "--threshold", "1.5"],
        ["library", "index", str(tmp_path / "nothing-*"), "-o", str(lib)],
        ["library", "index", str(tmp_path / "missing"), "-o", str(lib)],
        ["library", "compose", str(lib), "--like", str(pool / "a0"), "-m", "no-such-method", "-o", str(tmp_path / "o2")],
    ]
    for args in bad:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, r.stderr)


def test_transaction_is_all_or_nothing(pool: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    index_sources([str(pool)], lib)
    db = Library.open(lib)
    before = [(r["id"], r["source"], r["content_hash"]) for r in db.rows()]
    good = {**db.rows()[0], "source": "/elsewhere/x"}
    with pytest.raises(KeyError):  # the second row is broken: the delete and the first insert are rolled back
        db.apply([good, {"source": "/elsewhere/y"}], removed=[before[1][0]])
    assert [(r["id"], r["source"], r["content_hash"]) for r in db.rows()] == before
    db.close()


def test_non_lora_files_skipped_in_folders_refused_when_named(pool: Path, tmp_path: Path) -> None:
    save_file({"weight": torch.zeros(3, 3)}, str(pool / "junk.safetensors"))
    lines: list[str] = []
    r = index_sources([str(pool)], tmp_path / "lib", say=lines.append)
    assert r.total == 7 and len(r.skipped) == 1 and "junk.safetensors" in lines[0] and "not a recognised" in lines[0]
    runner = CliRunner()
    for args in (["library", "index", str(pool / "junk.safetensors"), "-o", str(tmp_path / "lib2")],
                 ["library", "index", str(pool / "a1"), "-o", str(pool / "a2")]):  # -o: not a library folder
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and res.stderr.startswith("error:") and len(res.stderr.strip().splitlines()) == 1, \
            res.output
    assert not (tmp_path / "lib2").exists()  # a refused first run leaves no library behind


def test_inspect_clusters_and_plot(pool: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    index_sources([str(pool)], lib)
    s = summary(lib, plot=tmp_path / "c.png", k=6)
    assert sum(c["size"] for c in s["clusters"]) == 7 and s["profiles"] == 0
    # six clusters for seven adapters: only the near-duplicate pair can share one
    pair = next(c for c in s["clusters"] if c["size"] == 2)
    assert Path(pair["representative"]).name in ("a0", "a0-copy")
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert summary(lib, k=6)["clusters"] == s["clusters"]  # seeded: the same clusters again
    r = CliRunner().invoke(app, ["library", "inspect", str(lib), "--plot", str(tmp_path / "c.jpg")])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "png" in r.stderr


def test_hub_ids_are_indexed_with_their_resolved_revision(pool: Path, tmp_path: Path, monkeypatch) -> None:
    """A Hub id is read through the Hugging Face cache (here seeded, offline): its row records the repo at the
    resolved commit, and its signature is the local copy's; an id that is not cached is one error line."""
    import huggingface_hub.constants as c
    from fakehub import seed_cache

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    seed_cache(cache, "org/lora-a0", {f.name: f.read_bytes() for f in (pool / "a0").iterdir() if f.is_file()},
               sha=sha, refs=("main", "v1"))
    lib = tmp_path / "lib"
    report = index_sources([str(pool / "a0"), "org/lora-a0@v1"], lib)
    assert len(report.added) == 2
    db = Library.open(lib)
    try:
        rows = {s: {"revision": r, "content_hash": h}
                for s, r, h in db.db.execute("SELECT source, revision, content_hash FROM adapters")}
    finally:
        db.close()
    hub_rows = [r for s, r in rows.items() if "/snapshots/" in s]
    assert [r["revision"] for r in hub_rows] == [f"org/lora-a0@{sha}"]
    local = rows[str((pool / "a0").resolve())]
    assert local["revision"] is None and local["content_hash"] == hub_rows[0]["content_hash"]
    r = CliRunner().invoke(app, ["library", "index", "org/not-cached", "-o", str(tmp_path / "lib2")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "org/not-cached" in r.output, r.output
    assert not (tmp_path / "lib2").exists()
