"""Domain profiles: the hierarchical router's per-adapter input statistics, searchable with one inner product.

An adapter's **profile** is fitted on a few unlabeled examples of its domain exactly as
``routing.profile.fit_profiles(..., through="base")`` fits the hierarchical router's profiles: for each
profiled module the mean μ and the variance of the module's input over the real tokens, the variance floored
at ``VAR_FLOOR`` × its mean over dimensions (σ²).  The profiled modules are fixed by the base model, not by
the adapter, so every adapter of a library is profiled at the same places: the ``q_proj`` modules (the
attention input; k/v read the same tensor) of every ``EVERY``-th layer.  Forward passes stop after the last
profiled module (the rest of the model and the LM head are never run).

A query of unlabeled examples is reduced to its token moments per profiled module: m = mean x, q = mean x²
over all its real tokens.  The hierarchical router's evidence for adapter s — the Gaussian log-likelihood
ℓ_s(x) = −½ Σ_d [(x_d − μ_sd)² / σ²_sd + log σ²_sd] summed over the profiled modules ("depth") and averaged
over the query's tokens — is then the inner product of two fixed vectors::

    query  [m, q, 1]                       (each of m, q: Σ_modules d numbers)
    adapter [μ/σ², −½/σ², −½ Σ (μ²/σ² + log σ²)]

so a faiss inner-product index ranks a library by exactly that statistic.  Scores are reported divided by the
number of profiled modules (the mean log-likelihood of a query token per module, without the 2π term).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LoraMergeError
from ..routing.api import load_base_model
from ..routing.calibrate import load_examples, make_batches
from ..threads import thread_policy

KINDS = ("q_proj",)
EVERY = 2
VAR_FLOOR = 0.05  # as routing.profile.fit_profiles
MAX_LENGTH = 128
BATCH_SIZE = 8


class _Done(Exception):
    """Raised by the last profiled module's hook: the rest of the forward pass is not needed."""


def profile_modules(model: nn.Module, kinds: Sequence[str] = KINDS, every: int = EVERY) -> list[str]:
    """The names of the profiled modules in forward order: ``kinds`` modules of every ``every``-th layer."""
    found = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in kinds and isinstance(m, nn.Linear)]
    if not found:
        raise LoraMergeError(f"the base model has no {'/'.join(kinds)} modules to profile; domain profiles need "
                             "a transformer with attention projections named like Llama's", field="base")
    return found[::every]


def file_hash(path: str | Path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=20).hexdigest()


@dataclass
class Moments:
    """Token moments of some text at the profiled modules: ``tokens`` real tokens, m/q [D] = mean x, mean x²."""

    tokens: int
    m: np.ndarray  # float64 [D]
    q: np.ndarray  # float64 [D]


class Profiler:
    """The base model (loaded once) and its profiled modules; ``moments(file)`` runs one JSONL file through it."""

    def __init__(self, base: str | Path, *, max_length: int = MAX_LENGTH, batch_size: int = BATCH_SIZE) -> None:
        self.base = Path(base)
        self.max_length, self.batch_size = max_length, batch_size
        with thread_policy():
            self.model = load_base_model(self.base, torch.device("cpu"))
        self.modules = profile_modules(self.model)
        self.dims = [int(self.model.get_submodule(n).in_features) for n in self.modules]
        self.vocab = getattr(self.model.config, "vocab_size", None)

    @property
    def dim(self) -> int:
        return sum(self.dims)

    def layout(self) -> tuple[list[str], list[int]]:
        """(the profiled module names, their input widths)."""
        return list(self.modules), list(self.dims)

    @torch.no_grad()
    def moments(self, path: str | Path) -> Moments:
        """Σ mask·x and Σ mask·x² (float64) per profiled module over the file's examples (as the router fits)."""
        batches = make_batches(load_examples(path, base=self.base, max_length=self.max_length,
                                             vocab_size=self.vocab), self.batch_size)
        sx = [torch.zeros(d, dtype=torch.float64) for d in self.dims]
        sxx = [torch.zeros(d, dtype=torch.float64) for d in self.dims]
        state: dict[str, Any] = {"mask": None}
        last = len(self.modules) - 1

        def hook(i: int) -> Callable[..., None]:
            def pre(_mod: nn.Module, args: tuple) -> None:
                x = args[0]
                h = x.reshape(-1, x.shape[-1]).double()
                m = state["mask"].reshape(-1, 1).double()
                sx[i].add_((m * h).sum(0))
                sxx[i].add_((m * h * h).sum(0))
                if i == last:
                    raise _Done
            return pre

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(i)) for i, n in enumerate(self.modules)]
        n = 0.0
        try:
            with thread_policy():
                for b in batches:
                    state["mask"] = b.attention_mask
                    n += float(b.attention_mask.sum())
                    try:
                        self.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                    except _Done:
                        pass
        finally:
            for h in handles:
                h.remove()
        return Moments(int(n), torch.cat(sx).numpy() / n, torch.cat(sxx).numpy() / n)


def profile_vector(mo: Moments, dims: Sequence[int], var_floor: float = VAR_FLOOR) -> np.ndarray:
    """The adapter side [2D + 1] float32 (see the module docstring) from the moments of its examples."""
    mu_parts, inv_parts, const = [], [], 0.0
    off = 0
    for d in dims:
        mu, q = mo.m[off:off + d], mo.q[off:off + d]
        var = np.clip(q - mu * mu, 0.0, None)
        var = var + var_floor * max(float(var.mean()), 1e-12)
        inv = 1.0 / var
        mu_parts.append(mu * inv)
        inv_parts.append(-0.5 * inv)
        const += -0.5 * float(np.sum(mu * mu * inv + np.log(var)))
        off += d
    return np.concatenate(mu_parts + inv_parts + [np.array([const])]).astype(np.float32)


def query_vector(mo: Moments) -> np.ndarray:
    """The query side [2D + 1] float32: the query's token moments and a 1."""
    return np.concatenate([mo.m, mo.q, [1.0]]).astype(np.float32)


def per_module_loglik(query: np.ndarray, adapter: np.ndarray, dims: Sequence[int]) -> np.ndarray:
    """[modules] float64: the query's mean token log-likelihood at each profiled module (they sum to the score).

    Each module's constant is recovered from the stored a = μ/σ², b = −½/σ²: σ² = −1/(2b), μ²/σ² = −a²/(2b)."""
    D = sum(dims)
    q64, a64 = query.astype(np.float64), adapter.astype(np.float64)
    out, off = [], 0
    for d in dims:
        a, b = a64[off:off + d], a64[D + off:D + off + d]
        const = -0.5 * float(np.sum(-a * a / (2 * b) + np.log(-1.0 / (2 * b))))
        out.append(float(q64[off:off + d] @ a + q64[D + off:D + off + d] @ b) + const)
        off += d
    return np.array(out)


def compute_moments(files: Sequence[Path], base: str | Path, *, ray_workers: int | None = None,
                    ray_address: str | None = None) -> tuple[list[str], list[int], list[Moments]]:
    """(profiled modules, their widths, the moments of every file in order): locally with one model, or on
    ``ray_workers`` Ray actors holding one model each (files dealt round-robin)."""
    if not ray_workers:
        prof = Profiler(base)
        return prof.modules, prof.dims, [prof.moments(f) for f in files]
    from ..distributed.session import ensure_ray

    ray = ensure_ray(ray_address, ray_workers)
    actor = ray.remote(num_cpus=1)(Profiler)
    actors = [actor.remote(Path(base)) for _ in range(max(1, min(ray_workers, len(files))))]
    try:
        try:
            modules, dims = ray.get(actors[0].layout.remote())
            refs = [actors[i % len(actors)].moments.remote(str(f)) for i, f in enumerate(files)]
            return modules, dims, list(ray.get(refs))
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, LoraMergeError):
                raise LoraMergeError(str(cause)) from None
            raise
    finally:
        for a in actors:
            ray.kill(a)
