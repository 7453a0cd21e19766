"""The base model, loaded once, and every adapter registered by name.

- ``base``: the base model itself, never wrapped.
- PEFT adapters (static merges included): one ``PeftModel`` over a module tree that shares the base's
  weights, every adapter loaded once with PEFT's own ``load_adapter`` under its name; a batch switches
  with ``set_adapter`` (no reloading).
- Routed adapters (implicit / gate / hierarchical): each is attached with :func:`runtime.attach` to
  its own module tree sharing the base's weights (attach refuses modules PEFT has wrapped).
- ``auto``: when a routed hierarchical adapter with profiles is registered, a request is scored
  against the profiles (:func:`routing.profile.select_adapter`) and served by the chosen input adapter:
  the PEFT adapter registered from the same folder when there is one, else the routed adapter with
  exactly that input's units active.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoraMergeError
from .decode import Row, Sampling, left_pad, run_batch
from .sources import AUTO, BASE, adapter_kind


@dataclass
class Target:
    """What one batch runs on: a model (module tree) plus the switch to make before the forward."""

    name: str
    kind: str  # "base" | "peft" | "routed"
    model: nn.Module
    path: str | None = None
    peft_name: str | None = None
    attached: Any = None  # runtime.Attached for routed adapters
    routed: Any = None  # the RoutedAdapter
    force: int | None = None  # auto on a routed hierarchical adapter: only this input's units
    adapters: list[str] = field(default_factory=list)  # what the response reports

    def activate(self) -> Callable[[], None]:
        """Make this target the active one; returns the undo."""
        if self.kind == "peft":
            self.model.set_adapter(self.peft_name)
        ctx = getattr(self.attached, "context", None)
        if self.force is not None and ctx is not None:
            ctx.force = self.force

            def undo() -> None:
                ctx.force = None
            return undo
        return lambda: None

    @property
    def hierarchical(self) -> bool:
        return self.routed is not None and any(m.router == "hierarchical" for m in self.routed.modules.values())


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LoraMergeError(f"«device» {device!r} is not a device (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoraMergeError(f"«device» {device}: CUDA is not available on this machine; use auto or cpu")
    return dev


def _shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree whose parameters and buffers are the very same tensors (no extra weight memory)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _reason(e: Exception) -> str:
    """The informative line of a PEFT/torch loading error (the first size mismatch, else the first line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)
    return line[:300].rstrip(".")


def _made_for(local: Path) -> str:
    import json

    try:
        made = json.loads((local / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        made = None
    return f" (the adapter was made for {made})" if made else ""


class Engine:
    """The base model, its tokenizer and the registered targets (all loaded before the first request)."""

    def __init__(self, base: str, adapters: Mapping[str, str] | None = None, *, device: str = "auto",
                 dtype: str = "float32") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..evals.suite.model import resolve_base

        self.device = pick_device(device)
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
        if torch_dtype is None:
            raise LoraMergeError(f"«dtype» {dtype!r} must be float32, float16 or bfloat16")
        folder = resolve_base(base)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise LoraMergeError(f"--base {base}: no usable tokenizer in {folder} ({type(e).__name__})") from None
        self.base_name = base
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).to(self.device).eval()
        cfg = self.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2048)
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = [self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        self.eos_ids = sorted({int(e) for e in eos if e is not None})
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.targets: dict[str, Target] = {BASE: Target(BASE, "base", self.model)}
        self._peft: nn.Module | None = None
        for name, path in (adapters or {}).items():
            self.add(name, path)
        self.auto = self._auto()

    # -- registration ------------------------------------------------------------------------------------
    def add(self, name: str, path: str) -> Target:
        kind, local = adapter_kind(path)
        t = self._add_routed(name, local) if kind == "routed" else self._add_peft(name, local)
        t.path = str(local)
        t.adapters = [name]
        self.targets[name] = t
        return t

    def _add_peft(self, name: str, local: Path) -> Target:
        from peft import PeftModel

        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(_shared_copy(self.model), str(local), adapter_name=name)
            else:
                self._peft.load_adapter(str(local), adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise LoraMergeError(f"{local}: PEFT cannot load this adapter onto --base {self.base_name}: "
                                 f"{_reason(e)}{_made_for(local)}") from None
        self._peft.to(self.device).eval()
        return Target(name, "peft", self._peft, peft_name=name)

    def _add_routed(self, name: str, local: Path) -> Target:
        from ..formats.routed import load_routed
        from ..routing.runtime import attach

        routed = load_routed(local)
        tree = _shared_copy(self.model)
        attached = attach(tree, routed)
        return Target(name, "routed", tree.eval(), attached=attached, routed=routed)

    def _auto(self) -> Target | None:
        """The ``auto`` composition: the first routed hierarchical adapter whose every layer has profiles."""
        for t in list(self.targets.values()):
            if not t.hierarchical:
                continue
            layers = [la for la in t.attached.layers.values() if la.router == "hierarchical"]
            if any(la.profile_mean is None for la in layers):
                continue
            self._choices = self._auto_choices(t)
            return Target(AUTO, "auto", t.model, attached=t.attached, routed=t.routed)
        self._choices = []
        return None

    def _auto_choices(self, t: Target) -> list[str]:
        """For each input s of the routed adapter: the target that serves a request assigned to s."""
        by_path = {Path(x.path).resolve(): x.name for x in self.targets.values() if x.kind == "peft" and x.path}
        out = []
        for s, src in enumerate(t.routed.sources):
            p = Path(str(src)).resolve()
            folder = p.parent if p.suffix in (".safetensors", ".bin", ".pt") else p  # a source is often the weights file
            name = by_path.get(folder) or by_path.get(p)
            if name is None:
                label = folder.name or f"input{s}"
                name = f"{t.name}[{label}]"
                self.targets[name] = Target(name, "routed", t.model, attached=t.attached, routed=t.routed,
                                            force=s, adapters=[label], path=t.path)
            out.append(name)
        return out

    def names(self) -> list[str]:
        """The public model names: base, the adapters, and auto when it exists."""
        pub = [n for n, t in self.targets.items() if t.force is None]
        return pub + ([AUTO] if self.auto is not None else [])

    def target(self, name: str) -> Target:
        if name == AUTO and self.auto is not None:
            return self.auto
        t = self.targets.get(name)
        if t is None or t.force is not None:
            raise KeyError(name)
        return t

    # -- prompts -----------------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise LoraMergeError(f"the tokenizer of {self.base_name} has no chat template; send a plain prompt "
                                 "(/v1/completions, or drop --chat)")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_context(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.context:
            raise LoraMergeError(
                f"this model's maximum context length is {self.context} tokens; the prompt has {n_prompt} tokens "
                f"and max_tokens asks for {max_tokens} more ({n_prompt + max_tokens} in all): shorten the prompt "
                "or lower max_tokens")

    # -- running -----------------------------------------------------------------------------------------
    def run(self, target: Target, rows: list[Row]) -> list[Row]:
        """One batch on one target (the caller serialises batches: one forward at a time)."""
        undo = target.activate()
        try:
            return run_batch(target.model, rows, self.tokenizer, eos_ids=self.eos_ids, pad_id=self.pad_id,
                             device=self.device)
        finally:
            undo()

    @torch.inference_mode()
    def select(self, prompts: list[list[int]]) -> list[str]:
        """``auto``: the target name chosen for each prompt (one forward over the left-padded batch)."""
        from ..routing.profile import select_adapter

        assert self.auto is not None
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        chosen = select_adapter(self.auto.model, self.auto.attached, ids, mask)
        return [self._choices[int(s)] for s in chosen.tolist()]

    def generate(self, name: str, ids: list[int], sampling: Sampling,
                 on_text: Callable[[str], None] | None = None) -> tuple[Row, list[str]]:
        """One prompt, in this thread (``loramerge generate``): the finished row and the adapters used."""
        self.check_context(len(ids), sampling.max_tokens)
        t = self.target(name)
        if t.kind == "auto":
            t = self.targets[self.select([ids])[0]]
        row = Row(list(ids), sampling, on_text=on_text)
        self.run(t, [row])
        return row, list(t.adapters)
