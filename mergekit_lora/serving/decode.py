"""The decoding loop shared by ``generate`` and ``serve``: a batch of left-padded rows, one KV cache.

It feeds the model exactly what ``transformers``' ``generate`` feeds it (position ids from the
attention mask, ``logits_to_keep=1``, a dynamic cache), so a greedy row of a batch of one is token for
token ``model.generate(..., do_sample=False)`` (tested).  Each row has its own sampling parameters: greedy
(temperature 0) or temperature + top-p with its own ``torch.Generator`` (``seed``: the same seed gives the
same text whatever else is in the batch), its own ``max_tokens`` and ``stop`` sequences.  Text comes out
incrementally: a piece is released once it cannot be the start of a stop sequence or half a character.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Sampling:
    """Per-request generation parameters (OpenAI's names)."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Row:
    """One sequence of a batch: the prompt ids in, tokens / text / finish reason out."""

    ids: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # called with each released piece of text
    cancelled: Callable[[], bool] | None = None  # the client went away: stop spending compute on it
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or a stop sequence), "length", "cancelled"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """Incremental detokenisation with stop sequences: ``push`` a token, get the text that is now safe."""

    def __init__(self, tokenizer, stop: Iterable[str]) -> None:
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent = 0
        self.text = ""

    def _decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens, skip_special_tokens=True)

    def push(self, tokens: list[int]) -> tuple[str, bool]:
        """(new safe text, whether a stop sequence ended the text)."""
        full = self._decode(tokens)
        hits = [at for s in self.stop if (at := full.find(s)) >= 0]
        if hits:  # the earliest stop sequence ends the text (it is not part of it)
            return self._release(full[: min(hits)]), True
        if full.endswith("\ufffd"):  # half a UTF-8 character: wait for the next token
            return "", False
        hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
        return self._release(full[: len(full) - hold]), False

    def finish(self, tokens: list[int]) -> str:
        """Everything not yet released (at eos or max_tokens)."""
        return self._release(self._decode(tokens).rstrip("\ufffd"))

    def _release(self, upto: str) -> str:
        piece = upto[self.sent:] if len(upto) > self.sent else ""
        self.sent = max(self.sent, len(upto))
        self.text = upto if len(upto) >= len(self.text) else self.text
        return piece


def _forward_args(model: nn.Module) -> tuple[str, bool]:
    """The model's name for the cache argument and whether it takes ``logits_to_keep``."""
    get_base = getattr(model, "get_base_model", None)
    root = get_base() if callable(get_base) else model
    params = set(inspect.signature(root.forward).parameters)
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _pick(logits: torch.Tensor, rows: list[Row], gens: list[torch.Generator | None]) -> list[int]:
    """The next token of every row: argmax, or a sample from softmax(logits / T) cut to the top-p mass."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, row in enumerate(rows):
        s = row.sampling
        if s.greedy or row.done:
            out.append(int(greedy[i]))
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)
        if s.top_p < 1.0:
            p, order = probs.sort(descending=True)
            keep = (p.cumsum(-1) - p) < s.top_p  # the most probable token is always kept
            probs = torch.zeros_like(probs).scatter(-1, order, p * keep)
        out.append(int(torch.multinomial(probs, 1, generator=gens[i]).item()))
    return out


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] with every prompt right-aligned (what decoder-only generation wants)."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def run_batch(model: nn.Module, rows: list[Row], tokenizer, *, eos_ids: Iterable[int], pad_id: int,
              device: torch.device) -> list[Row]:
    """Generate for every row until eos, a stop sequence, its ``max_tokens`` or cancellation."""
    if not rows:
        return rows
    eos = set(eos_ids)
    ids, mask = left_pad([r.ids for r in rows], pad_id, device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache_kw, keep = _forward_args(model)
    gens = [None if r.sampling.greedy else _generator(r.sampling.seed, device) for r in rows]
    streams = [TextStream(tokenizer, r.sampling.stop) for r in rows]
    cache = None
    cur, cur_pos = ids, pos
    live = list(range(len(rows)))  # the rows still in the batch, in batch order
    for _step in range(max(r.sampling.max_tokens for r in rows)):
        kwargs = {"input_ids": cur, "attention_mask": mask, "position_ids": cur_pos, "use_cache": True}
        if cache is not None:
            kwargs[cache_kw] = cache
        if keep:
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        cache = out.get("cache", None)
        if cache is None:  # transformers before the `cache` rename
            cache = out.get("past_key_values", None)
        nxt = _pick(out.logits[:, -1, :].float(), [rows[j] for j in live], [gens[j] for j in live])
        for i, j in enumerate(live):
            _advance(rows[j], nxt[i], streams[j], eos)
        still = [i for i, j in enumerate(live) if not rows[j].done]
        if not still:
            break
        cur = torch.tensor(nxt, dtype=torch.long, device=device)[:, None]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        cur_pos = cur_pos[:, -1:] + 1
        if len(still) < len(live) and hasattr(cache, "batch_select_indices"):  # finished rows leave the batch
            keep_idx = torch.tensor(still, dtype=torch.long, device=device)
            cache.batch_select_indices(keep_idx)
            cur, mask, cur_pos = cur[keep_idx], mask[keep_idx], cur_pos[keep_idx]
            live = [live[i] for i in still]
    for i, r in enumerate(rows):
        if not r.done:  # max_tokens of 0 never enters the loop body for this row
            r.finish_reason = "length"
        r.text = streams[i].text
    return rows


def _advance(r: Row, token: int, stream: TextStream, eos: set[int]) -> None:
    """Take one sampled token into a row: eos, stop sequences, max_tokens and cancellation end it."""
    if r.done:
        return
    if r.cancelled is not None and r.cancelled():
        r.finish_reason = "cancelled"
    elif token in eos:
        r.finish_reason = "stop"
        _emit(r, stream.finish(r.tokens))
    else:
        r.tokens.append(token)
        piece, stopped = stream.push(r.tokens)
        _emit(r, piece)
        if stopped:
            r.finish_reason = "stop"
        elif len(r.tokens) >= r.sampling.max_tokens:
            r.finish_reason = "length"
            _emit(r, stream.finish(r.tokens))


def _emit(row: Row, piece: str) -> None:
    if piece and row.on_text is not None:
        row.on_text(piece)
