"""Task-scoring speed on the suite model: gradient mode, batch size, threads (wall and CPU seconds).

    OMP_NUM_THREADS=1 python evals/bench/eval_speed.py --task polarity --task language -n 300

Each setting scores the same encoded examples with one committed adapter attached (PEFT), after a
warm-up batch; CPU seconds (process time, all threads) are the robust number on a shared machine,
wall seconds depend on the other load.  The accuracy must be identical in every setting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mergekit_lora.evals.tasks import attached, encode_suite, last_logits, load_base, pad_id_of, score


@torch.no_grad()
def score_no_grad(model, task, batch_size, pad_id):
    """The scorer before this change: torch.no_grad, the same length-sorted batches."""
    order = sorted(range(len(task)), key=lambda i: len(task.ids[i]))
    correct = 0
    labels = task.label_tokens
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        logits = last_logits(model, [task.ids[i] for i in idx], torch.device("cpu"), pad_id)
        correct += int((logits[:, labels].argmax(1) == task.gold[idx]).sum())
    return correct / len(task)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", action="append", default=None)
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--adapter-root", type=Path, default=Path("examples/suite"))
    ap.add_argument("--threads", type=int, nargs="*", default=[1])
    args = ap.parse_args()
    tasks = args.task or ["polarity"]
    model, tok = load_base("smollm2-135m", torch.device("cpu"))
    pad = pad_id_of(tok)
    enc = encode_suite(tok, tasks, args.n)
    print("| task | tokens/example | threads | mode | batch | wall s | CPU s | accuracy |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name, e in enc.items():
        toks = sum(map(len, e.ids)) / len(e)
        with attached(model, args.adapter_root / name) as m:
            score(m, type(e)(e.name, e.ids[:8], e.gold[:8], e.label_tokens), batch_size=8, pad_id=pad)  # warm-up
            for threads in args.threads:
                torch.set_num_threads(threads)
                for mode, bs in (("no_grad", 16), ("inference_mode", 16), ("inference_mode", 32),
                                 ("inference_mode", 64)):
                    w0, c0 = time.perf_counter(), time.process_time()
                    if mode == "no_grad":
                        acc = score_no_grad(m, e, bs, pad)
                    else:
                        acc = score(m, e, batch_size=bs, pad_id=pad).accuracy
                    w, c = time.perf_counter() - w0, time.process_time() - c0
                    print(f"| {name} | {toks:.1f} | {threads} | {mode} | {bs} | {w:.1f} | {c:.1f} | {acc:.3f} |",
                          flush=True)


if __name__ == "__main__":
    main()
