"""Task evaluation with a real model: label-word next-token prediction over a shared frozen LM head.

A task example is ``before + text + after`` followed by one label word; the model's next-token
logits restricted to the task's label tokens give the prediction (accuracy), and the full-vocabulary
cross-entropy of the gold label token is the loss (the same objective the suite's adapters are
trained with).  Batches are left-padded with explicit position ids, so a padded batch scores the
same as one example at a time.

Adapters are attached through ``ATTACHERS`` (adapter kind -> context manager that attaches the
adapter to the base model and removes it on exit); PEFT folders are the built-in kind, and other
runtimes (e.g. a routed adapter) register their own kind with :func:`register_attacher`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mergekit_lora.errors import LoraMergeError


# ---------------------------------------------------------------------------------------------- encoding
@dataclass(frozen=True)
class EncodedTask:
    """Token ids of every example, the gold class per example and the label token per class."""

    name: str
    ids: list[list[int]]
    gold: torch.Tensor  # [n] class index
    label_tokens: torch.Tensor  # [C] token id of each class's label word

    def __len__(self) -> int:
        return len(self.ids)


def label_tokens(tokenizer, labels: Sequence[str]) -> list[int]:
    """The first token of each label word; they must differ, or the task cannot be scored."""
    toks = [tokenizer.encode(w, add_special_tokens=False)[0] for w in labels]
    if len(set(toks)) != len(toks):
        raise LoraMergeError(f"label words {list(labels)} share a first token with this tokenizer; choose others")
    return toks


def encode_task(task, tokenizer, examples, max_text_tokens: int = 64) -> EncodedTask:
    """Tokenise ``before + text[:max_text_tokens] + after`` for each example (text truncated in tokens)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    before, after = enc(task.before), enc(task.after)
    ids = [before + enc(e.text)[:max_text_tokens] + after for e in examples]
    gold = torch.tensor([e.label for e in examples], dtype=torch.long)
    return EncodedTask(task.name, ids, gold, torch.tensor(label_tokens(tokenizer, task.labels)))


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), left-padded so the last column is every row's last token."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r):] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    return ids, mask, pos


def last_logits(model: nn.Module, rows: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0) -> torch.Tensor:
    """Next-token logits [batch, vocab] after each row's last token (one forward, left-padded)."""
    ids, mask, pos = pad_left(rows, pad_id)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :].float()


@dataclass(frozen=True)
class TaskScore:
    """Accuracy and mean loss over ``n`` examples; ``correct[i]`` is 1 when example i (task order) was right
    (in :meth:`as_dict` a string of ``0``/``1`` characters, compact in JSON reports)."""

    accuracy: float
    loss: float
    n: int
    correct: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, float | str]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n, "correct": "".join(map(str, self.correct))}


@torch.inference_mode()
def score(model: nn.Module, task: EncodedTask, *, batch_size: int = 16, device: torch.device | None = None,
          pad_id: int = 0) -> TaskScore:
    """Accuracy (argmax over the label tokens) and mean cross-entropy of the gold label token.

    Examples are batched by length (similar lengths share a batch, so little padding is computed);
    the per-example outcomes come back in the task's order, for paired comparisons between variants.
    """
    if len(task) == 0:
        raise LoraMergeError(f"task {task.name!r} has no examples to evaluate")
    device = device or next(model.parameters()).device
    order = sorted(range(len(task)), key=lambda i: len(task.ids[i]))  # similar lengths share a batch
    correct = [0] * len(task)
    loss = 0.0
    labels = task.label_tokens.to(device)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits = last_logits(model, [task.ids[i] for i in idx], device, pad_id)
        gold = task.gold[idx].to(device)
        pred = logits[:, labels].argmax(1)
        for i, ok in zip(idx, (pred == gold).tolist()):
            correct[i] = int(ok)
        loss += float(torch.nn.functional.cross_entropy(logits, labels[gold], reduction="sum"))
    return TaskScore(sum(correct) / len(task), loss / len(task), len(task), tuple(correct))


# ---------------------------------------------------------------------------------------------- attaching
AttachFn = Callable[[nn.Module, Path], AbstractContextManager[nn.Module]]
ATTACHERS: dict[str, AttachFn] = {}
_DETECTORS: list[tuple[str, Callable[[Path], bool]]] = []


def register_attacher(kind: str, detect: Callable[[Path], bool], attach: AttachFn) -> None:
    """Add an adapter kind; later registrations are tried first (a routed folder may also look like PEFT)."""
    ATTACHERS[kind] = attach
    _DETECTORS.insert(0, (kind, detect))


def adapter_kind(path: Path) -> str:
    for kind, detect in _DETECTORS:
        if detect(Path(path)):
            return kind
    raise LoraMergeError(f"{path}: no registered runtime can attach this adapter (kinds: {', '.join(ATTACHERS)})")


@contextmanager
def attach_peft(model: nn.Module, path: Path) -> Iterator[nn.Module]:
    """Inject the PEFT adapter at ``path`` into ``model``; on exit remove it (base weights untouched)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    pm.to(next(model.parameters()).device)
    pm.eval()
    try:
        yield pm
    finally:
        pm.unload()


register_attacher("peft", lambda p: (p / "adapter_config.json").is_file(), attach_peft)


@contextmanager
def attach_routed(model: nn.Module, path: Path) -> Iterator[nn.Module]:
    """Attach a routed adapter (``loramerge route`` output) with the torch runtime; detach on exit."""
    from mergekit_lora.formats.routed import load_routed
    from mergekit_lora.routing.runtime import attach, detach

    attach(model, load_routed(path))
    try:
        yield model
    finally:
        detach(model)


register_attacher("routed", lambda p: (p / "routing_config.json").is_file(), attach_routed)


def attached(model: nn.Module, path: str | Path) -> AbstractContextManager[nn.Module]:
    """The model with the adapter at ``path`` attached, whatever its kind."""
    p = Path(path)
    if not p.exists():
        raise LoraMergeError(f"{p}: no such adapter folder")
    return ATTACHERS[adapter_kind(p)](model, p)


# ---------------------------------------------------------------------------------------------- the matrix
def load_base(base: str, device: torch.device):
    """(model, tokenizer) for a base name or folder (see :func:`suite.model.resolve_base`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .suite.model import resolve_base

    folder = resolve_base(base)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    return model, tok


def pad_id_of(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0)


def encode_suite(tokenizer, tasks: Sequence[str], examples: int | None, max_text_tokens: int = 64, *,
                 split: str = "test") -> dict[str, EncodedTask]:
    """The first ``examples`` examples of each suite task's ``split`` (``test`` or ``validation``: the
    head of the train split, for choosing settings without touching the test set), tokenised once."""
    from .suite.data import get_task

    out = {}
    for name in tasks:
        t = get_task(name)
        ex = t.test(examples) if split == "test" else t.validation(examples)
        out[name] = encode_task(t, tokenizer, ex, max_text_tokens)
    return out


def evaluate_variant(model: nn.Module, adapter: str | Path | None, encoded: dict[str, EncodedTask], *,
                     batch_size: int = 16, device: torch.device, pad_id: int = 0) -> dict[str, dict[str, float]]:
    """{task: {accuracy, loss, n}} for the base model with ``adapter`` attached (``None``: the base alone)."""
    def run(m: nn.Module) -> dict[str, dict[str, float]]:
        return {name: score(m, enc, batch_size=batch_size, device=device, pad_id=pad_id).as_dict()
                for name, enc in encoded.items()}

    if adapter is None:
        return run(model)
    with attached(model, adapter) as m:
        return run(m)


def evaluate_matrix(model: nn.Module, tokenizer, adapters: dict[str, str | Path], tasks: Sequence[str], *,
                    examples: int | None = 100, batch_size: int = 16, device: torch.device,
                    max_text_tokens: int = 64, include_base: bool = True,
                    progress: Callable[[str], None] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{variant: {task: {accuracy, loss, n}}} for the base model (``"base"``) and every adapter."""
    encoded = encode_suite(tokenizer, tasks, examples, max_text_tokens)
    variants: dict[str, str | Path | None] = {"base": None} if include_base else {}
    variants.update(adapters)
    out = {}
    for variant, path in variants.items():
        if progress:
            progress(variant)
        out[variant] = evaluate_variant(model, path, encoded, batch_size=batch_size, device=device,
                                        pad_id=pad_id_of(tokenizer))
    return out


def normalized_accuracy(matrix: dict[str, dict[str, dict[str, float]]], variant: str,
                        own: dict[str, str]) -> float | None:
    """Mean over tasks of acc(variant, task) / acc(own adapter of task, task); None without own adapters."""
    ratios = []
    for task, adapter in own.items():
        ref = matrix.get(adapter, {}).get(task)
        got = matrix.get(variant, {}).get(task)
        if ref is None or got is None or ref["accuracy"] == 0:
            return None
        ratios.append(got["accuracy"] / ref["accuracy"])
    return sum(ratios) / len(ratios) if ratios else None
