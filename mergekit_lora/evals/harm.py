"""What a merge costs outside the merged tasks: perplexity on generic text, accuracy on tasks no input learned.

A merge that wins its tasks but damages the base model is not a win (a flattened spectrum at a large
scale can carry several times the average's energy).  Two measures, both relative to the base model:

- **generic perplexity**: next-token perplexity on passages of the Python reference manual's prose
  (``pydoc_data.topics``, shipped with every CPython: English technical text no suite task uses), as the
  ratio merged / base (1.0: no harm; 1.2: 20 % more perplexed);
- **unseen tasks**: accuracy on suite tasks none of the merged adapters was trained for, as the difference
  merged − base (points; negative: the merge broke something the base could do).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn


def generic_passages(n: int, min_words: int = 40) -> list[str]:
    """The first ``n`` paragraphs of ≥ ``min_words`` words from the Python reference manual (topic order)."""
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(para.split())
            if len(text.split()) >= min_words and not text.startswith((">>>", "...")):
                out.append(text)
                if len(out) == n:
                    return out
    return out


def encode_passages(tokenizer, passages: Sequence[str], max_tokens: int = 128) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"][:max_tokens] for p in passages]


@torch.no_grad()
def perplexity(model: nn.Module, rows: Sequence[Sequence[int]], *, device: torch.device, pad_id: int = 0,
               batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over every predicted token of ``rows`` (right-padded batches)."""
    nll, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        batch = rows[s:s + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        target = ids[:, 1:].to(device)
        keep = mask[:, 1:].to(device).bool()
        tok_nll = -logp.gather(-1, target[..., None])[..., 0]
        nll += float(tok_nll[keep].double().sum())
        count += int(keep.sum())
    return math.exp(nll / max(count, 1))
