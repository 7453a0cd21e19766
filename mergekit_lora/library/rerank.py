"""Second-stage retrieval: rerank a profile shortlist by each candidate adapter's own behaviour on the query.

A domain profile describes an adapter's *inputs*; two adapters profiled on the same inputs (one trained on the
task's labels, one on shuffled labels or a different task's data in the same prompt) get the same profile score.
What separates them is what each adapter *does* with the query: with the adapter attached to the base model, the
next-token distribution p_i = p(· | example i) at the end of each unlabeled example (where a task adapter gives
its answer).  Two statistics over the query's N examples (nats):

- ``confidence`` = −(1/N) Σ_i H(p_i): an adapter trained for these prompts answers them decisively;
- ``infomax`` = H(p̄) − (1/N) Σ_i H(p_i), p̄ = (1/N) Σ_i p_i: the mutual information between example and
  answer — decisive *and* input-dependent (an adapter that says the same token for every example scores 0).

Both need one forward pass of the query per candidate with the candidate attached (PEFT, through the eval
harness's attacher), so they are applied to a shortlist only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LoraMergeError
from ..evals.tasks import attached
from ..routing.calibrate import load_examples, make_batches
from ..threads import thread_policy

RERANKS = ("none", "confidence", "infomax")


@torch.no_grad()
def answer_distributions(model: nn.Module, base: str | Path, examples: str | Path, *, max_length: int = 128,
                         batch_size: int = 32) -> torch.Tensor:
    """[N, vocab] float64: the next-token distribution after each example's last real token (as attached now).

    Only the last position of each row goes through the LM head."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = make_batches(load_examples(examples, base=base, max_length=max_length, vocab_size=vocab), batch_size)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    out = []
    with thread_policy():
        for b in batches:
            h = decoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state  # [B, T, H]
            last = b.attention_mask.sum(1) - 1
            logits = head(h[torch.arange(h.shape[0]), last]).double()  # [B, V]
            out.append(torch.softmax(logits, dim=-1))
    return torch.cat(out)


def behaviour_score(p: torch.Tensor, statistic: str) -> float:
    """The ``statistic`` (``confidence`` or ``infomax``, see the module docstring) of answer distributions [N, V]."""
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)  # [N]
    if statistic == "confidence":
        return float(-ent.mean())
    if statistic == "infomax":
        pbar = p.mean(0)
        return float(-(pbar * torch.log(pbar.clamp_min(1e-300))).sum() - ent.mean())
    raise LoraMergeError(f"--rerank {statistic}: unknown statistic (choose from {', '.join(RERANKS)})",
                         field="rerank")


def rerank_scores(model: nn.Module, base: str | Path, sources: Sequence[str], examples: str | Path,
                  statistic: str) -> list[float]:
    """The ``statistic`` of every adapter in ``sources`` on the unlabeled ``examples`` (model: the base, with
    nothing attached; each adapter is attached in turn and removed again)."""
    if statistic not in RERANKS or statistic == "none":
        raise LoraMergeError(f"--rerank {statistic}: unknown statistic (choose from {', '.join(RERANKS)})",
                             field="rerank")
    out = []
    for s in sources:
        with attached(model, s):
            out.append(behaviour_score(answer_distributions(model, base, examples), statistic))
    if not all(np.isfinite(out)):
        raise LoraMergeError(f"--rerank {statistic}: a candidate adapter gives non-finite next-token "
                             "probabilities on these examples")
    return out
