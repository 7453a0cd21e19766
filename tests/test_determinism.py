"""Same inputs + seed = identical bytes, whatever the CPU thread count (issue 14).

Every method runs through the real CLI in fresh processes with OMP_NUM_THREADS (and torch's thread count) 1, 2 and 4; the
sha256 of every output file (weights, config, card, recipe) must agree.  The adapters are large
enough (384×384, rank 16) for MKL to split its work across threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from reliab_helpers import peft_config, peft_tensors, write_peft

METHODS = {
    "linear": [], "cat": [], "svd": ["-p", "rank=8"], "lego": ["-p", "k=8"],
    "ties": ["--density", "0.5"], "dare_linear": ["--density", "0.5"], "dare_ties": ["--density", "0.5"],
    "magnitude_prune": ["--density", "0.5"], "ties-exact": ["--density", "0.5", "-p", "exact_svd=true"],
    "route": ["-p", "top_k=1"], "ties-core": ["--density", "0.5", "-p", "space=core"],
    "dare_ties-core": ["--density", "0.5", "-p", "space=core"], "knots_ties": ["--density", "0.5"],
    "knots_dare_ties": [], "tsv": [], "iso_c": ["--rank", "8"], "iso_cts": [],
}

RUN_ALL = textwrap.dedent("""
    import hashlib, json, sys, torch
    from pathlib import Path
    from mergekit_lora.cli.main import app
    a, b, methods = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(int(sys.argv[4]))  # torch caps OMP_NUM_THREADS at the core count
    out = {"threads": torch.get_num_threads()}
    for name, extra in methods.items():
        folder = Path(name) / "merged"  # the same output name in every run: the card records it
        try:
            app(["merge", a, b, "--method", name.split("-")[0], "-o", str(folder), *extra], standalone_mode=False)
        except SystemExit as e:
            assert not e.code, (name, e.code)
        out[name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
    print(json.dumps(out))
""")


def run_all(tmp_path: Path, threads: int, a: Path, b: Path) -> dict:
    work = tmp_path / f"t{threads}"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", RUN_ALL, str(a), str(b), json.dumps(METHODS), str(threads)], cwd=work,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_outputs_are_byte_identical_across_thread_counts(tmp_path):
    a = write_peft(tmp_path / "a", tensors=peft_tensors(0, r=16, d=384), config=peft_config(16))
    b = write_peft(tmp_path / "b", tensors=peft_tensors(1, r=16, d=384), config=peft_config(16))
    runs = {t: run_all(tmp_path, t, a, b) for t in (1, 2, 4)}
    assert [runs[t]["threads"] for t in (1, 2, 4)] == [1, 2, 4]
    for name in METHODS:
        files = runs[1][name]
        assert any(f.endswith(".safetensors") for f in files) and "README.md" in files, (name, files)
        for t in (2, 4):
            diff = sorted(f for f in files if runs[t][name].get(f) != files[f])
            assert not diff, f"{name}: {diff} differ between 1 and {t} threads"
