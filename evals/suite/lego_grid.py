"""Run an ``eval compare`` config on a validation slice of the train split instead of the test set.

The suite's test set (first 300 shuffled examples of each task) is what evals/RESULTS.md reports; choosing
a default on it would tune to the reported numbers.  This runs the same comparison on the *last* ``n``
examples of each task's train split (``Task.split()[0][-n:]``).  Caveat: the suite adapters were trained
on the whole train split, so the individual adapters score higher here than on the test set; the slice
still keeps the choice off the reported examples.

    python evals/suite/lego_grid.py evals/suite/compare-lego-grid.yaml -o out/lego-val -n 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("-n", "--examples", type=int, default=100, help="validation examples per task")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--test", action="store_true", help="the test set after all (the config's own examples)")
    ap.add_argument("--merges-only", action="store_true",
                    help="skip the base model and the individual adapters (their rows are NaN; for runs whose "
                         "reference rows were measured before on the same examples)")
    ap.add_argument("--only", default="", help="comma-separated labels: run only these methods of the config")
    args = ap.parse_args(argv)

    from mergekit_lora.evals import compare
    from mergekit_lora.evals.suite.data import get_task
    from mergekit_lora.evals.tasks import encode_task

    def encode_validation(tokenizer, tasks, examples, max_text_tokens=64):
        out = {}
        for name in tasks:
            t = get_task(name)
            out[name] = encode_task(t, tokenizer, t.split()[0][-examples:], max_text_tokens)
        return out

    if not args.test:
        compare.encode_suite = encode_validation  # the one place compare picks its examples
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.jsonl")  # one line per evaluated variant, as it finishes
    evaluate = compare.evaluate_variant

    cfg, root = compare.load_config(args.config)
    individual = {str(root / p) for p in cfg.adapters.values()}

    def evaluate_and_log(model, adapter, encoded, **kw):
        if args.merges_only and (adapter is None or str(adapter) in individual):
            return {t: {"accuracy": float("nan"), "loss": float("nan"), "n": 0} for t in encoded}
        res = evaluate(model, adapter, encoded, **kw)
        with open(partial, "a") as f:
            f.write(json.dumps({"adapter": str(adapter), "tasks": res}) + "\n")
        return res

    compare.evaluate_variant = evaluate_and_log
    methods = [m for m in cfg.methods if not args.only or getattr(m, "label", None) in args.only.split(",")]
    cfg = cfg.model_copy(update={"examples": args.examples, "device": args.device, "methods": methods})
    compare.run_compare(cfg, root, args.out, force=True)


if __name__ == "__main__":
    main()
