"""`loramerge serve` as a real process on 127.0.0.1, called with the official `openai` client (no mock).

One server for the module: the planted two-domain tiny Llama (tests/test_hierarchical.py's problem), PEFT
adapters a and b, their routed (implicit) composition, and a hierarchical routed adapter with profiles, so
``auto`` exists.  Every greedy answer is compared token for token with transformers' own generate: PeftModel
for a PEFT adapter, ``attach()`` for a routed one, ``select_adapter`` + the chosen adapter for ``auto``.
"""

from __future__ import annotations

import signal
import threading

import httpx
import pytest
from serve_helpers import Server, adapters, char_tokenizer, domain_text, hierarchical_adapter, tiny_base
from test_generate import reference, text

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
KEY = "sk-test-key"
CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once its graceful shutdown is over


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = tiny_base(tmp / "base", planted_domains=True)
    ad = adapters(tmp)
    ad["hier"] = hierarchical_adapter(base, ad["a"], ad["b"], tmp / "hier")
    args = ["--base", str(base), "--api-key", KEY, "--log-level", "warning",
            *[x for name in ("a", "b", "routed", "gate", "hier") for x in ("--adapter", f"{name}={ad[name]}")]]
    server = Server(args)
    yield base, ad, server
    rc, out = server.stop()
    assert rc in CLEAN_EXIT, out


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[2].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def ids_of(prompt: str) -> list[int]:
    return char_tokenizer()(prompt)["input_ids"]


def chat_ids(messages) -> list[int]:
    tok = char_tokenizer()
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"]


def test_models_lists_base_adapters_and_auto(client):
    names = [m.id for m in client.models.list().data]
    assert names == ["base", "a", "b", "routed", "gate", "hier", "auto"]


@pytest.mark.parametrize("model,kind", [("base", None), ("a", "peft"), ("routed", "routed"), ("gate", "routed"),
                                        ("hier", "routed")])
def test_completion_greedy_equals_transformers_generate(stack, client, model, kind):
    base, ad, _ = stack
    r = client.completions.create(model=model, prompt="Hello world", max_tokens=20, temperature=0)
    want = reference(base, kind, ad.get(model), ids_of("Hello world"))
    assert r.choices[0].text == text(want) and r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("length" if len(want) == 20 else "stop")
    assert r.model == model and r.mergekit_lora["adapters"] == ([] if model == "base" else [model])


@pytest.mark.parametrize("domain,name", [(0, "a"), (1, "b")])
def test_auto_selects_by_content_and_equals_the_chosen_adapter(stack, client, domain, name):
    """auto = select_adapter over the profiles (as the runtime computes it), then that adapter's own LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergekit_lora.routing import load_routed
    from mergekit_lora.routing.profile import select_adapter
    from mergekit_lora.runtime import attach

    base, ad, _ = stack
    prompt = domain_text(domain, 1, seed=100 + domain, length=12)[0]
    m = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    handle = attach(m, load_routed(ad["hier"]))
    with torch.no_grad():
        assert select_adapter(m, handle, torch.tensor([ids_of(prompt)])).tolist() == [domain]
    r = client.completions.create(model="auto", prompt=prompt, max_tokens=16, temperature=0)
    assert r.mergekit_lora["adapters"] == [name]
    assert r.choices[0].text == text(reference(base, "peft", ad[name], ids_of(prompt), n=16))


def test_chat_and_streaming_equal_the_reference(stack, client):
    base, ad, _ = stack
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = text(reference(base, "routed", ad["routed"], chat_ids(messages), n=12))
    r = client.chat.completions.create(model="routed", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="routed", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    by_ids = client.completions.create(model="routed", prompt=ids_of("Hello"), max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text(reference(base, "routed", ad["routed"], ids_of("Hello"), n=12))
    parts = list(client.completions.create(model="b", prompt="Hello", max_tokens=15, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == text(reference(base, "peft", ad["b"], ids_of("Hello"), n=15))
    assert all(p.mergekit_lora["adapters"] == ["b"] for p in parts)


def test_stop_sequences(client):
    full = client.completions.create(model="a", prompt="Hello world", max_tokens=20, temperature=0).choices[0].text
    stop = full[6:9]
    r = client.completions.create(model="a", prompt="Hello world", max_tokens=20, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="a", prompt="Hello world", max_tokens=20, temperature=0, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in s) == full[: full.index(stop)]


def test_seed_reproducible_and_top_p_tiny_is_greedy(client):
    def run(**kw):
        return client.completions.create(model="routed", prompt="Hello", max_tokens=20, **kw).choices[0].text

    greedy = run(temperature=0)
    a, b, c = run(temperature=1.0, seed=11), run(temperature=1.0, seed=11), run(temperature=1.0, seed=12)
    assert a == b and a != c and a != greedy
    assert run(temperature=1.2, top_p=1e-9, seed=5) == greedy  # only the most probable token survives top-p


def test_errors_in_openai_shape(stack, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x")
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for kw, param in [({"temperature": 5}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
                      ({"top_p": 0}, "top_p"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="a", prompt="x", **kw)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error", kw
    with pytest.raises(openai.BadRequestError) as e:  # 60 characters + 10 tokens > the 64-token context
        client.completions.create(model="a", prompt="x" * 60, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded" and "maximum context length is 64" in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=stack[2].url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(stack[2].url + "/v1/completions", content=b"{" + b" " * 1_100_000 + b"}",
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(stack[2].url + "/v1/completions", content=b"not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_are_batched_per_adapter_with_the_same_answers(stack, client):
    prompts = {("a", "Hello"): None, ("a", "Howdy"): None, ("routed", "Hello"): None, ("routed", "Hi!!!"): None}
    for model, p in prompts:
        prompts[model, p] = client.completions.create(model=model, prompt=p, max_tokens=10, temperature=0).choices[0].text
    before = httpx.get(stack[2].url + "/health").json()
    got: dict[int, tuple] = {}
    jobs = [(model, p) for model, p in prompts for _ in range(4)]

    def call(i, model, p):
        r = client.completions.create(model=model, prompt=p, max_tokens=10, temperature=0)
        got[i] = (model, p, r.choices[0].text, r.mergekit_lora["adapters"])

    threads = [threading.Thread(target=call, args=(i, *j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == len(jobs)
    assert all(txt == prompts[m, p] and used == [m] for m, p, txt, used in got.values())
    after = httpx.get(stack[2].url + "/health").json()
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < len(jobs)


def test_sigterm_drains_in_flight_requests(stack):
    """Last in this file: it ends the module's server (uvicorn's graceful shutdown finishes the stream first)."""
    base, _, server = stack
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    stream = c.completions.create(model="base", prompt="Hello", max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))  # the request is in flight
    server.proc.terminate()
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in ("length", "stop")
    assert first.choices[0].text + "".join(p.choices[0].text for p in rest) == text(
        reference(base, None, None, ids_of("Hello"), n=40))
    rc, out = server.stop()
    assert rc in CLEAN_EXIT, out
