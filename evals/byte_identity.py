"""Byte-identity check for refactors: run a fixed set of CLI merges and print the sha256 of every output file.

    python evals/byte_identity.py > before.json      # on the old code
    python evals/byte_identity.py --against before.json   # on the new code: exit 1 on any difference

Inputs are the committed example adapters plus a kohya + diffusers pair built from the test helpers.
Every command runs in a fresh process with one thread (``OMP_NUM_THREADS=1``), in one fixed temp folder
(recipes and cards record paths).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Relative to the checkout (commands run there), so that two checkouts give the same recipes and cards.
SUITE = [f"examples/suite/{t}" for t in ("topic", "sentiment", "genre", "language")]
TINY = [f"examples/{t}" for t in ("tiny-llama-double", "tiny-llama-shift")]


def _sd_pair(tmp: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from sd_helpers import diffusers_state_dict, kohya_state_dict, save

    return [str(save(tmp / "k.safetensors", kohya_state_dict(seed=1))),
            str(save(tmp / "d.safetensors", diffusers_state_dict(seed=2)))]


def commands(tmp: Path) -> dict[str, list[str]]:
    sd = _sd_pair(tmp)
    q = "0.25,0.25,0.25,0.25"
    recipe = tmp / "recipe.yaml"
    return {
        "linear": ["merge", *SUITE, "--method", "linear", "--weights", q],
        "linear-bf16": ["merge", *SUITE, "--method", "linear", "--dtype", "bfloat16"],
        "cat": ["merge", *TINY, "--method", "cat", "--weights", "1,0.5"],
        "svd": ["merge", *SUITE, "--method", "svd", "--rank", "8", "--weights", q],
        "ties": ["merge", *SUITE, "--method", "ties", "--density", "0.5", "--rank", "8"],
        "ties-core": ["merge", *SUITE, "--method", "ties", "--weights", "0.5,-0.3,0.8,0.4", "-p", "space=core"],
        "dare": ["merge", *TINY, "--method", "dare_linear", "--density", "0.5", "--seed", "3"],
        "dare-ties": ["merge", *SUITE, "--method", "dare_ties", "--density", "0.5", "--seed", "3",
                      "--weights", "0.5,-0.3,0.8,0.4"],
        "prune": ["merge", *TINY, "--method", "magnitude_prune", "--density", "0.3"],
        "lego": ["cluster", *SUITE, "-k", "8", "--weights", q, "--report"],
        "lego-lsq": ["cluster", *SUITE, "-k", "8", "--reweight", "lsq"],
        "route": ["route", *SUITE, "--top-k", "8"],
        "sd-linear": ["merge", *sd, "--method", "linear", "--weights", "0.5,0.5"],
        "sd-lego": ["cluster", *sd, "-k", "4"],
        "recipe-emit": ["merge", *SUITE[:2], "--method", "svd", "--rank", "4", "--emit-recipe", str(recipe)],
        "recipe-run": ["run", str(recipe), "--force"],
    }


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="a JSON printed by an earlier run: compare and fail on differences")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out: dict[str, dict[str, str]] = {}
    tmp = Path(tempfile.gettempdir()) / "mergekit-lora-bytecheck"  # a fixed path: recipes and cards name it
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, cmd in commands(tmp).items():
            dest = tmp / "out" / name
            if name == "recipe-run":  # the recipe names the output of recipe-emit
                dest = tmp / "out" / "recipe-emit"
                full = [sys.executable, "-m", "mergekit_lora.cli.main", *cmd]
            else:
                full = [sys.executable, "-m", "mergekit_lora.cli.main", *cmd, "-o", str(dest)]
            r = subprocess.run(full, env=env, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                print(f"{name}: exit {r.returncode}\n{r.stderr}", file=sys.stderr)
                return 1
            out[name] = digest(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.against is None:
        json.dump(out, sys.stdout, indent=1)
        print()
        return 0
    before = json.loads(args.against.read_text())
    bad = [f"{name}/{f}" for name in sorted(set(before) | set(out))
           for f in sorted(set(before.get(name, {})) | set(out.get(name, {})))
           if before.get(name, {}).get(f) != out.get(name, {}).get(f)]
    for b in bad:
        print(f"differs: {b}")
    print(f"{sum(len(v) for v in out.values())} files compared, {len(bad)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
