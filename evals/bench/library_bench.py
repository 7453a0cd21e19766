"""Benchmark: the adapter library at N synthetic adapters of the SmolLM2-135M layout (data-free signatures).

30 layers, hidden 576, q/k/v/o LoRA at r=8 (k/v project to 192: 3 KV heads × 64), fp32 PEFT folders with
seeded random factors, written to a temporary folder (not timed).  Measured in this process:

* index: ``index_sources`` on the folder, cold (every adapter read, hashed, signed; one transaction; faiss);
* re-index with nothing changed (the size+mtime fast path), and the incremental add of one new adapter;
* peak RSS (``ru_maxrss``) before and after indexing; disk: catalogue.sqlite + signatures.faiss;
* query latency: ``search(LIB, --like catalogued adapter, top_m=5)`` end to end (open the catalogue, check
  the faiss file against it, search), median and p95 over ``--queries``; the same for an adapter that is not
  catalogued (its signature computed per query); and the bare faiss search;
* dedupe over the whole library.

    OMP_NUM_THREADS=1 python evals/bench/library_bench.py --n 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

LAYERS, HIDDEN, KV, RANK = 30, 576, 192, 8
PROJ = {"q_proj": HIDDEN, "k_proj": KV, "v_proj": KV, "o_proj": HIDDEN}  # name -> d_out (d_in = HIDDEN)


def write_adapter(p: Path, seed: int) -> None:
    p.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {}
    for layer in range(LAYERS):
        for name, d_out in PROJ.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            t[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=g) / HIDDEN ** 0.5
            t[f"{key}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g) * 0.01
    save_file(t, str(p / "adapter_model.safetensors"))
    (p / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M",
        "target_modules": sorted(PROJ), "task_type": "CAUSAL_LM"}))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="adapters in the library")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    from mergekit_lora.library import dedupe, index_sources, search
    from mergekit_lora.library.store import CATALOGUE, INDEX, Library

    with tempfile.TemporaryDirectory(prefix="library-bench-") as tmp:
        root, lib = Path(tmp) / "adapters", Path(tmp) / "lib"
        t = time.perf_counter()
        for i in range(args.n):
            write_adapter(root / f"adapter{i:05d}", i)
        written = time.perf_counter() - t
        adapter_mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        rss0 = rss_mb()
        t = time.perf_counter()
        r = index_sources([str(root)], lib)
        index_s = time.perf_counter() - t
        rss1 = rss_mb()
        assert r.total == args.n, r
        t = time.perf_counter()
        index_sources([str(root)], lib)
        reindex_s = time.perf_counter() - t
        write_adapter(root / "zz-new", 10**6)
        t = time.perf_counter()
        r2 = index_sources([str(root)], lib)
        add_one_s = time.perf_counter() - t
        assert len(r2.added) == 1
        queries = [root / f"adapter{i % args.n:05d}" for i in range(args.queries)]
        lat = []
        for q in queries:
            t = time.perf_counter()
            hits = search(lib, q, top_m=5)
            lat.append(time.perf_counter() - t)
            assert Path(hits[0]["source"]).name == q.name
        outside = Path(tmp) / "query"  # not catalogued: its signature is computed per query
        write_adapter(outside, 2 * 10**6)
        ext = []
        for _ in range(5):
            t = time.perf_counter()
            search(lib, outside, top_m=5)
            ext.append(time.perf_counter() - t)
        db = Library.open(lib)
        index = db.index()
        _, vecs = db.vectors()
        db.close()
        bare = []
        for i in range(args.queries):
            t = time.perf_counter()
            index.search(vecs[i % len(vecs)][None, :], 5)
            bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        dedupe(lib, 0.99)
        dedupe_s = time.perf_counter() - t
        disk = {name: (lib / name).stat().st_size for name in (CATALOGUE, INDEX)}
    lat_ms = sorted(x * 1e3 for x in lat)
    out = {
        "n": args.n, "adapter_mb_total": round(adapter_mb, 1), "write_s": round(written, 1),
        "index_s": round(index_s, 2), "index_ms_per_adapter": round(index_s / args.n * 1e3, 1),
        "reindex_unchanged_s": round(reindex_s, 3), "add_one_s": round(add_one_s, 3),
        "rss_before_mb": round(rss0), "rss_after_index_mb": round(rss1),
        "catalogue_bytes": disk[CATALOGUE], "faiss_bytes": disk[INDEX],
        "search_ms_median": round(statistics.median(lat_ms), 2),
        "search_ms_p95": round(lat_ms[int(0.95 * (len(lat_ms) - 1))], 2),
        "search_uncatalogued_ms_median": round(statistics.median(ext) * 1e3, 1),
        "faiss_search_ms_median": round(statistics.median(bare) * 1e3, 4), "dedupe_s": round(dedupe_s, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()], "threads": os.environ.get("OMP_NUM_THREADS"),
        "signature_dim": int(np.asarray(vecs).shape[1]),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
