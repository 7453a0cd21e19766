"""Hub pull and push through the real huggingface_hub client: a seeded cache offline, and a local
fake Hub on 127.0.0.1 (tests/fakehub.py) for downloads, errors and uploads.  No external network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from fakehub import FakeHub, seed_cache
from typer.testing import CliRunner

from mergekit_lora import load_adapter, merge
from mergekit_lora.errors import LoraMergeError
from mergekit_lora.hub import parse_hub_id

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_TESTsecret0123456789"
runner = CliRunner()


def example_files(name: str, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in (EXAMPLES / name).iterdir() if p.is_file()}


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """A private HF cache, no token anywhere, offline by default."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.chdir(tmp_path)
    return cache


def go_online(monkeypatch) -> None:
    """huggingface_hub reads HF_HUB_OFFLINE at import time (conftest sets it): switch both off."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)


def cli(*args: str):
    from mergekit_lora.cli.main import app

    return runner.invoke(app, list(args))


def test_parse_hub_id():
    assert str(parse_hub_id("org/name")) == "org/name"
    h = parse_hub_id("org/name/sub@v1.2")
    assert (h.repo_id, h.subfolder, h.revision) == ("org/name", "sub", "v1.2")
    for local in ("./x", "/abs/x", "~/x", "a/b/c/d", "x", "org/name@", "org/n/a.safetensors", "C:\\x"):
        assert parse_hub_id(local) is None, local


def test_offline_cache_load_by_branch_tag_commit_and_subfolder(hf):
    seed_cache(hf, "org/lora-a", example_files("tiny-llama-shift"), sha=SHA, refs=("main", "v1.2"))
    seed_cache(hf, "org/multi", example_files("tiny-llama-double", "b/"), sha="f" * 40)
    local = load_adapter(EXAMPLES / "tiny-llama-shift")
    for src in ("org/lora-a", "org/lora-a@v1.2", f"org/lora-a@{SHA}"):
        a = load_adapter(src)
        assert a.meta.extra["resolved_revision"] == SHA and a.label == src
        assert "/snapshots/" + SHA in str(a.path)
        for name in local.module_names():
            assert torch.equal(a.units(name).delta(), local.units(name).delta())
    b = load_adapter("org/multi/b")
    assert b.meta.extra["resolved_revision"] == "f" * 40 and len(b) == len(load_adapter(EXAMPLES / "tiny-llama-double"))


def test_offline_errors_and_local_paths(hf):
    seed_cache(hf, "org/lora-a", example_files("tiny-llama-shift"), sha=SHA)
    with pytest.raises(LoraMergeError) as e:
        load_adapter("org/missing")
    assert str(e.value) == ("org/missing: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download "
                            "it once online or unset HF_HUB_OFFLINE")
    with pytest.raises(LoraMergeError, match="org/lora-a@v9: not in the local Hugging Face cache"):
        load_adapter("org/lora-a@v9")
    for local in ("./org/name", "a/b/c/d"):
        with pytest.raises(LoraMergeError) as e:
            load_adapter(local)
        assert str(e.value) == f"{local}: no such file or folder"


def test_merge_from_hub_records_resolved_revision_in_card(hf):
    seed_cache(hf, "org/lora-a", example_files("tiny-llama-shift"), sha=SHA, refs=("main", "v1.2"))
    r = cli("merge", "org/lora-a@v1.2", str(EXAMPLES / "tiny-llama-double"), "-o", "out", "--weights", "0.5,0.5")
    assert r.exit_code == 0, r.output
    card = Path("out/README.md").read_text()
    assert f"| 0 | `org/lora-a@v1.2` | {SHA} | 0.5 |" in card
    recipe = yaml.safe_load(Path("out/recipe.yaml").read_text())
    assert recipe["adapters"][0] == {"source": "org/lora-a@v1.2", "weight": 0.5}
    # the dry run of a recipe shows the resolved commit
    Path("r.yaml").write_text("method: linear\nadapters:\n  - {source: org/lora-a@v1.2}\noutput: {path: o2}\n")
    r = cli("run", "r.yaml", "--dry-run")
    assert r.exit_code == 0 and SHA[:8] in r.output, r.output


def test_online_pull_reuses_cache_and_maps_errors(hf, monkeypatch):
    go_online(monkeypatch)
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        files = example_files("tiny-llama-shift") | {"adapter_model.bin": b"pickle!", "notes.txt": b"x"}
        sha = hub.add_repo("org/lora-a", files, tags=("v1",))
        hub.add_repo("org/gated", example_files("tiny-llama-shift"), gated=True)
        hub.add_repo("org/empty", {"config.json": b"{}", "model.bin": b"x"})
        a = load_adapter("org/lora-a@v1")
        assert a.meta.extra["resolved_revision"] == sha
        snap = hf / "models--org--lora-a" / "snapshots" / sha
        assert sorted(p.name for p in snap.iterdir()) == ["README.md", "adapter_config.json",
                                                            "adapter_model.safetensors"]  # allow_patterns
        assert (hf / "models--org--lora-a" / "refs" / "v1").read_text() == sha
        cases = {
            "org/nope": "org/nope: no such repo on the Hub (or it is private and HF_TOKEN is missing or lacks access)",
            "org/gated": "org/gated: the repo is gated; accept its terms on the Hub and set HF_TOKEN to a token with "
                         "access",
            "org/empty": "org/empty: no adapter files (adapter_config.json, *.safetensors) in the repo org/empty; "
                         "pickle files are skipped unless allow_pickle",
            "org/lora-a@nope": "org/lora-a@nope: the repo has no revision 'nope'; use a branch, tag or commit",
        }
        for src, msg in cases.items():
            with pytest.raises(LoraMergeError) as e:
                load_adapter(src)
            assert str(e.value) == msg
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert load_adapter("org/gated").meta.extra["resolved_revision"]
    # the server is gone: offline, the cached snapshot is reused
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert load_adapter("org/lora-a@v1").meta.extra["resolved_revision"] == sha


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_push_cli_uploads_folder_and_card_without_printing_token(hf, monkeypatch):
    merge([str(EXAMPLES / "tiny-llama-shift"), str(EXAMPLES / "tiny-llama-double")], "linear", "out",
          weights=[0.5, 0.5])
    go_online(monkeypatch)
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        r = cli("push", "out", "org/merged", "--private", "--revision", "dev", "--commit-message", "merge v1")
        assert r.exit_code == 0, r.output
        assert TOKEN not in r.output and TOKEN not in (r.stderr or "")
        assert hub.create_payloads == [{"name": "merged", "organization": "org", "visibility": "private",
                                        "type": "model"}]
        assert hub.commit_headers[-1]["summary"] == "merge v1"
        got = hub.files("org/merged", "dev")
        assert sorted(got) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        for name, data in got.items():
            assert data == (Path("out") / name).read_bytes(), name
        fm = front_matter(got["README.md"].decode())
        assert fm["base_model"] == "examples/tiny-llama" and fm["base_model_relation"] == "adapter"
        assert fm["library_name"] == "peft" and {"lora", "mergekit-lora", "linear"} <= set(fm["tags"])
        assert hub.files("org/merged", "main") == {}  # pushed to the branch only
        assert all(req["headers"].get("authorization") == f"Bearer {TOKEN}" for req in hub.requests
                   if req["method"] == "POST")


def test_push_without_token_fails_before_any_request(hf, monkeypatch):
    merge([str(EXAMPLES / "tiny-llama-shift")], "linear", "out")
    go_online(monkeypatch)
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = cli("push", "out", "org/merged")
        assert r.exit_code == 2
        assert "error: pushing to the Hub needs a token: set HF_TOKEN (a write token) or run `hf auth login`" in r.output
        assert hub.requests == []
        r = cli("push", "nowhere", "org/merged")
        assert r.exit_code == 2 and "nowhere: no such folder" in r.output


def test_recipe_push_to_hub(hf, monkeypatch):
    go_online(monkeypatch)
    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        sha = hub.add_repo("org/lora-a", example_files("tiny-llama-shift"))
        text = (f"method: cat\nadapters:\n  - {{source: org/lora-a}}\n  - {{source: {EXAMPLES / 'tiny-llama-double'}}}\n"
                "output: {path: merged, push_to_hub: org/merged-cat}\n")
        Path("r.yaml").write_text(text)
        r = cli("run", "r.yaml")
        assert r.exit_code == 0, r.output
        assert TOKEN not in r.output
        got = hub.files("org/merged-cat")
        assert got["recipe.yaml"].decode() == text
        card = got["README.md"].decode()
        assert f"| 0 | `org/lora-a` | {sha} |" in card and "## Recipe" in card
        assert front_matter(card)["library_name"] == "peft"
