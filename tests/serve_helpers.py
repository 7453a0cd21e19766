"""A tiny Llama folder with a character tokenizer and chat template, tiny adapters for it, a server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import VOCAB, make_peft_adapter, tiny_llama
from test_hierarchical import DOMAINS, planted_llama  # two token ranges: "!".."F" and "Q".."}"

# ids: 0 = " ", 1 = <s>, 2 = </s>, 3.. = the 94 visible ASCII characters (97 = helpers.VOCAB)
CHARS = [" "] + [chr(c) for c in range(33, 127)]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: (0 if i == 0 else i + 2) for i, c in enumerate(CHARS)}
    vocab.update({"<s>": 1, "</s>": 2})
    assert len(vocab) == VOCAB
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"})
    tok.chat_template = TEMPLATE
    return tok


def tiny_base(path: Path, *, planted_domains: bool = False) -> Path:
    m = planted_llama() if planted_domains else tiny_llama(0)
    m.save_pretrained(str(path))
    char_tokenizer().save_pretrained(str(path))
    return path


def domain_text(d: int, n: int, seed: int, length: int = 9) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = DOMAINS[d]
    return ["".join(CHARS[i - 2] for i in torch.randint(lo, hi, (length - k % 3,), generator=g).tolist())
            for k in range(n)]


def hierarchical_adapter(base: Path, a: Path, b: Path, out: Path) -> Path:
    """route --router hierarchical over a, b with profiles fitted on each domain's text (written to ``out``)."""
    from transformers import AutoModelForCausalLM

    from mergekit_lora import merge
    from mergekit_lora.atomic import atomic_output
    from mergekit_lora.routing import load_routed, write_routed
    from mergekit_lora.routing.calibrate import make_batches
    from mergekit_lora.routing.profile import fit_profiles
    from mergekit_lora.runtime import attach

    merge([a, b], "route", out.with_name(out.name + "-raw"), params={"top_k": 4, "router": "hierarchical"})
    routed = load_routed(out.with_name(out.name + "-raw"))
    m = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    handle = attach(m, routed)
    tok = char_tokenizer()
    data = [make_batches([(tok(t)["input_ids"],) * 2 for t in domain_text(d, 8, 10 + d)], 4) for d in range(2)]
    fit_profiles(m, handle, data)
    fitted = handle.routed(routed)
    with atomic_output(out) as tmp:
        write_routed(tmp, fitted.modules.items(), base_model=None, sources=fitted.sources)
    return out


def adapters(tmp: Path) -> dict[str, Path]:
    """Two PEFT adapters on the tiny Llama, their routed compositions (implicit top-3, gate top-4), a ties merge."""
    from mergekit_lora import merge

    a = make_peft_adapter(tmp / "a", seed=1, target_modules=["q_proj", "v_proj", "o_proj"])
    b = make_peft_adapter(tmp / "b", seed=2, r=6, target_modules=["q_proj", "o_proj"])
    merge([a, b], "route", tmp / "routed", params={"top_k": 3})
    merge([a, b], "route", tmp / "gate", params={"top_k": 4, "router": "gate"})
    merge([a, b], "ties", tmp / "ties", params={"density": 0.5})
    return {"a": a, "b": b, "routed": tmp / "routed", "gate": tmp / "gate", "ties": tmp / "ties"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``loramerge serve`` as a real child process on 127.0.0.1 (stopped with SIGTERM)."""

    def __init__(self, args: list[str], *, timeout: float = 120.0) -> None:
        self.port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "mergekit_lora.cli.main", "serve", *args, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        import httpx

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                httpx.get(self.url + "/health", timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start")

    def stop(self, timeout: float = 30.0) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out
