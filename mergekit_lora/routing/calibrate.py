"""Calibrate a router on a little data: the base model and every unit frozen, only G (and d) move.

Data: a JSONL file, one example per line, either ``{"input_ids": [...]}`` (token ids; optional
``"labels": [...]`` of the same length with -100 for positions without a target: a labelled set) or
``{"text": "..."}`` (tokenised with the tokenizer saved in the base model folder).  Without labels the
objective is next-token loss on the whole text (unlabelled).  The loss is the model's own causal-LM
loss plus ``balance`` × the Switch-style load-balancing term R·Σ_i f_i P_i (f_i: share of routing
slots taken by unit i, P_i: mean gate probability of unit i; gate router).  The selection bias d is
updated by the aux-loss-free rule d_i += bias_rate·sign(mean load − load_i) (both routers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraMergeError
from ..progress import progress_bar
from .runtime import Attached, RoutedLoraLayer


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


@dataclass
class CalibrationResult:
    loss_before: float
    loss_after: float
    steps: int
    history: list[float] = field(default_factory=list)


def _tokenizer(base: Path | None, path: Path):  # noqa: ANN202 - a transformers tokenizer
    if base is None:
        raise LoraMergeError(f"{path}: rows with \"text\" need a tokenizer; pass «base» MODEL (a folder with one) "
                             "or give token ids as {\"input_ids\": [...]}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError):
        raise LoraMergeError(f"{path}: rows with \"text\" need a tokenizer but {base} has none; "
                             "give token ids as {\"input_ids\": [...]} instead") from None


def load_examples(path: str | Path, *, base: str | Path | None = None, max_length: int = 128,
                  vocab_size: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per JSONL row; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LoraMergeError(f"{path}: calibration data file not found")
    tok = None
    out: list[tuple[list[int], list[int]]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraMergeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or ("input_ids" not in row and "text" not in row):
            raise LoraMergeError(f"{path}:{lineno}: each line must be an object with \"input_ids\" or \"text\"")
        if "input_ids" in row:
            ids = row["input_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise LoraMergeError(f"{path}:{lineno}: \"input_ids\" must be a non-empty list of token ids")
        else:
            tok = tok or _tokenizer(Path(base) if base else None, path)
            ids = tok(str(row["text"]))["input_ids"]
        labels = row.get("labels", ids)
        if not isinstance(labels, list) or len(labels) != len(ids) or not all(isinstance(i, int) for i in labels):
            raise LoraMergeError(f"{path}:{lineno}: \"labels\" must be a list of ints as long as the input")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise LoraMergeError(f"{path}:{lineno}: token id {max(ids)} is outside the model's vocabulary "
                                 f"({vocab_size}); the data was made for another tokenizer")
        out.append((ids[:max_length], labels[:max_length]))
    if not out:
        raise LoraMergeError(f"{path}: no examples; the calibration file is empty")
    return out


def make_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[Batch]:
    """Right-padded batches in file order (pad id 0, label -100, attention mask 0)."""
    batches = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        att = torch.zeros(len(chunk), T, dtype=torch.long)
        lab = torch.full((len(chunk), T), -100, dtype=torch.long)
        for i, (x, y) in enumerate(chunk):
            ids[i, :len(x)] = torch.tensor(x)
            att[i, :len(x)] = 1
            lab[i, :len(y)] = torch.tensor(y)
        batches.append(Batch(ids, att, lab))
    return batches


def _forward_loss(model: nn.Module, b: Batch) -> torch.Tensor:
    return model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss


def _set_mask(layers: Sequence[RoutedLoraLayer], b: Batch | None) -> None:
    for layer in layers:
        layer.token_mask = None if b is None else b.attention_mask.reshape(-1).bool()


@torch.no_grad()
def lm_loss(model: nn.Module, batches: Sequence[Batch], device: torch.device | None = None) -> float:
    """Mean causal-LM loss over ``batches`` (the calibration objective without the balance term)."""
    device = device or next(model.parameters()).device
    total = sum(float(_forward_loss(model, b.to(device))) for b in batches)
    return total / max(len(batches), 1)


def balance_loss(layer: RoutedLoraLayer, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Switch-style R·Σ f_i P_i over the real tokens of the last forward (gate router only)."""
    if layer.last_logits is None or layer.last_weights is None:
        return None
    logits, w = layer.last_logits, layer.last_weights
    if mask is not None and mask.numel() == logits.shape[0]:
        logits, w = logits[mask], w[mask]
    R = logits.shape[-1]
    f = (w.detach() != 0).float().mean(0) / max(min(layer.top_k, R), 1)
    P = torch.softmax(logits / layer.temperature, dim=-1).mean(0)
    return R * (f * P).sum()


def calibrate(model: nn.Module, attached: Attached, batches: Sequence[Batch], *, steps: int = 200,
              lr: float = 1e-2, balance: float = 0.01, bias_rate: float = 1e-3, seed: int = 0,
              device: torch.device | None = None, progress: bool = False) -> CalibrationResult:
    """Fit the gate matrices (Adam) and selection biases in place; the model's own weights never change."""
    if not batches:
        raise LoraMergeError("calibration needs at least one batch of data")
    device = device or next(model.parameters()).device
    layers = list(attached.layers.values())
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    gates = [layer.gate for layer in layers if layer.gate is not None]
    for g in gates:
        g.requires_grad_(True)
    before = lm_loss(model, batches, device)
    opt = torch.optim.Adam(gates, lr=lr) if gates else None
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[float] = []
    was_training = model.training
    model.eval()  # no dropout: the base model is frozen and deterministic
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("calibrating router", total=steps)
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                b = batches[order.pop()].to(device)
                for layer in layers:
                    layer.capture = True
                _set_mask(layers, b)
                loss = _forward_loss(model, b)
                mask = b.attention_mask.reshape(-1).bool()
                aux = [x for x in (balance_loss(layer, mask) for layer in layers) if x is not None]
                total = loss + balance * torch.stack(aux).mean() if aux and balance > 0 else loss
                if opt is not None and total.requires_grad:
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                with torch.no_grad():
                    for layer in layers:
                        w = layer.last_weights
                        if bias_rate > 0 and w is not None and layer.top_k < layer.rank:
                            load = (w[mask] != 0).float().mean(0) if mask.numel() == w.shape[0] else \
                                (w != 0).float().mean(0)
                            layer.bias += bias_rate * torch.sign(load.mean() - load).to(layer.bias.dtype)
                history.append(float(loss.detach()))
                bar.advance(task)
    finally:
        for layer in layers:
            layer.capture = False
            layer.last_logits = layer.last_weights = None
        _set_mask(layers, None)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for g in gates:
            g.requires_grad_(False)
        model.train(was_training)
    return CalibrationResult(before, lm_loss(model, batches, device), steps, history)


@torch.no_grad()
def measure_activation(model: nn.Module, attached: Attached, batches: Sequence[Batch],
                       device: torch.device | None = None) -> None:
    """Record each unit's mean activation weight E[w_i·m_i] over the real tokens of ``batches``."""
    device = device or next(model.parameters()).device
    layers = list(attached.layers.values())
    for layer in layers:
        layer.reset_stats()
        layer.record = True
    try:
        for b in batches:
            b = b.to(device)
            _set_mask(layers, b)
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for layer in layers:
            layer.record = False
        _set_mask(layers, None)
