"""The retrieval evaluation's library: the suite's real adapters, the distractors (how each kind is made:
``DISTRACTORS``), their profile example files, and the held-out query sets.  Used by ``retrieval_eval.py``."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergekit_lora.evals.suite.data import get_task

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "examples" / "suite"
REAL = {"topic": ["topic"], "sentiment": ["sentiment"], "genre": ["genre"], "language": ["language"],
        "script": ["script", "r4/script"], "polarity": ["polarity"], "region": ["region", "r16/region", "r4/region"],
        "subject": ["subject", "r16/subject"]}
PROFILE_ROWS = 16
SIZES = (8, 32)
DRAWS = 2
SIGNATURE_DRAWS = 1  # the gradient query costs a full forward + backward: one draw per task and k
TEXT_CHARS = 120
EVAL_FROM = 100
DISTRACTORS = """\
- **class slices** (41, one per class of each task): profile examples = 16 train rows of that one class in the
  task's own prompt; weights = a near-duplicate of the task's r = 8 adapter (every factor + Gaussian noise of
  10-50 % of its RMS, seeded): a narrower adapter derived from the right one — the hardest kind for both methods.
- **cross-template** (56, every ordered pair of tasks): task X's train texts in task Y's prompt; weights =
  random directions with Y's adapter's spectrum (per module: the singular values of Y's ΔW on random orthonormal
  bases).
- **shuffled words** (32, 4 seeds per task): a task's train texts with their words shuffled, in its own prompt;
  weights = a near-duplicate (20 % noise) of another task's adapter.
- **other text** (80): sets of 16 docstring sentences of Python standard-library modules (one module, or a few
  consecutive small ones, per set), no prompt; weights = random directions with the spectrum of a random real
  adapter.
"""


def prompt(task: str, text: str) -> str:
    t = get_task(task)
    return t.before + text[:TEXT_CHARS] + t.after


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _copy_config(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")


def near_duplicate(src: Path, dst: Path, noise: float, seed: int) -> None:
    if (dst / "adapter_model.safetensors").is_file():  # made by an earlier run (same seed: same bytes)
        return
    g = torch.Generator().manual_seed(seed)
    t = load_file(str(src / "adapter_model.safetensors"))
    out = {}
    for k in sorted(t):
        v = t[k].float()
        rms = v.pow(2).mean().sqrt()
        out[k] = (v + noise * rms * torch.randn(v.shape, generator=g)).to(t[k].dtype)
    _copy_config(src, dst, out)


def spectrum_matched(src: Path, dst: Path, seed: int) -> None:
    """Per module: ΔW's singular values (from the factors) on random orthonormal bases, split evenly into A, B."""
    if (dst / "adapter_model.safetensors").is_file():
        return
    g = torch.Generator().manual_seed(seed)
    t = load_file(str(src / "adapter_model.safetensors"))
    out = {}
    for ka in sorted(k for k in t if "lora_A" in k):
        kb = ka.replace("lora_A", "lora_B")
        A, B = t[ka].float(), t[kb].float()
        s = torch.linalg.svdvals(B @ A)[: A.shape[0]]
        U, _ = torch.linalg.qr(torch.randn(B.shape[0], A.shape[0], generator=g))
        V, _ = torch.linalg.qr(torch.randn(A.shape[1], A.shape[0], generator=g))
        out[kb] = (U * s.sqrt()).to(t[kb].dtype).contiguous()
        out[ka] = (s.sqrt()[:, None] * V.T).to(t[ka].dtype).contiguous()
    _copy_config(src, dst, out)


SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3",
                "ensurepip", "venv", "webbrowser", "pty", "tty", "curses", "readline", "msvcrt", "winreg",
                "winsound", "nt", "_winapi"}


def stdlib_sentences(n_sets: int, seed: int) -> list[list[str]]:
    """``n_sets`` sets of 16 docstring sentences (>= 4 words) of standard-library modules, taken in a shuffled
    module order (a set spans one module, or a few consecutive small ones)."""
    import importlib
    import warnings

    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    rnd = random.Random(seed)
    rnd.shuffle(names)
    pool: list[str] = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that does not import cleanly here is just not used
            continue
        docs = [d for d in [mod.__doc__] + [getattr(v, "__doc__", None) for v in vars(mod).values()
                                            if callable(v) and getattr(v, "__module__", None) == name]
                if isinstance(d, str)]
        pool += [" ".join(s.split())[:TEXT_CHARS] for d in docs for s in d.split(". ") if len(s.split()) >= 4]
        if len(pool) >= n_sets * PROFILE_ROWS:
            break
    return [pool[i:i + PROFILE_ROWS] for i in range(0, n_sets * PROFILE_ROWS, PROFILE_ROWS)
            if len(pool[i:i + PROFILE_ROWS]) == PROFILE_ROWS]


def build(work: Path) -> dict:
    done = work / "build.json"
    if done.is_file():
        return json.loads(done.read_text())
    dis, ex = work / "distractors", work / "examples"
    real = {}
    for task, rels in REAL.items():
        rows = [prompt(task, e.text) for e in get_task(task).validation(PROFILE_ROWS)]
        for rel in rels:
            real[str((SUITE / rel).resolve())] = str(write_jsonl(ex / "real" / f"{rel.replace('/', '-')}.jsonl", rows))
    examples = dict(real)
    kinds: dict[str, str] = {}
    rnd = random.Random(0)
    seed = 100
    tasks = list(REAL)
    for task in tasks:  # class slices
        t = get_task(task)
        train = t.split()[0]
        for c, label in enumerate(t.labels):
            rows = [prompt(task, e.text) for e in train if e.label == c][:PROFILE_ROWS]
            name = f"slice-{task}-{label.strip().replace(' ', '_')}"
            near_duplicate(SUITE / task, dis / name, rnd.uniform(0.1, 0.5), seed := seed + 1)
            examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", rows))
            kinds[str((dis / name).resolve())] = "class slice"
    for x in tasks:  # cross-template
        texts = [e.text for e in get_task(x).validation(PROFILE_ROWS)]
        for y in tasks:
            if x == y:
                continue
            name = f"cross-{x}-in-{y}"
            spectrum_matched(SUITE / y, dis / name, seed := seed + 1)
            examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", [prompt(y, s) for s in texts]))
            kinds[str((dis / name).resolve())] = "cross-template"
    for task in tasks:  # shuffled words
        for k in range(4):
            r = random.Random(1000 + k)
            texts = []
            for e in get_task(task).validation(PROFILE_ROWS):
                words = e.text.split()
                r.shuffle(words)
                texts.append(prompt(task, " ".join(words)))
            other = rnd.choice([t for t in tasks if t != task])
            name = f"shuffled-{task}-{k}"
            near_duplicate(SUITE / other, dis / name, 0.2, seed := seed + 1)
            examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", texts))
            kinds[str((dis / name).resolve())] = "shuffled words"
    for i, sents in enumerate(stdlib_sentences(80, 0)):  # other text
        name = f"other-{i:02d}"
        spectrum_matched(SUITE / rnd.choice(tasks), dis / name, seed := seed + 1)
        examples[str((dis / name).resolve())] = str(write_jsonl(ex / f"{name}.jsonl", sents))
        kinds[str((dis / name).resolve())] = "other text"
    info = {"examples": examples, "kinds": kinds, "real": real}
    done.write_text(json.dumps(info, indent=1))
    return info


def queries(work: Path) -> dict[tuple[str, int, int], Path]:
    out = {}
    for task in REAL:
        test = get_task(task).test()
        for k in SIZES:
            for d in range(DRAWS):
                rows = [prompt(task, e.text) for e in test[d * k:(d + 1) * k]]
                out[(task, k, d)] = write_jsonl(work / "queries" / f"{task}-{k}-{d}.jsonl", rows)
    return out


SHORTLISTS = (3, 5)
STATISTICS = ("confidence", "infomax")
VAL_DRAWS = 1
RERANK_SIZES = SIZES
RERANK_DRAWS = DRAWS
VAL_K = 32


def validation_queries(work: Path, info: dict) -> dict[tuple[str, int, int], Path]:
    """``VAL_DRAWS`` sets of ``VAL_K`` prompts per task from the *train* split's end, none of them a profile row
    of any adapter: the queries every knob (statistic, shortlist) is chosen on."""
    used = {json.loads(line)["text"] for f in info["examples"].values() for line in Path(f).read_text().splitlines()}
    out = {}
    for task in REAL:
        rows = [prompt(task, e.text) for e in reversed(get_task(task).split()[0])]
        rows = [r for r in rows if r not in used][:VAL_DRAWS * VAL_K]
        for d in range(VAL_DRAWS):
            out[(task, VAL_K, d)] = write_jsonl(work / "val-queries" / f"{task}-{VAL_K}-{d}.jsonl",
                                                rows[d * VAL_K:(d + 1) * VAL_K])
    return out
