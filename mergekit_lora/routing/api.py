"""``route()``: the public function behind ``loramerge route``.

Training-free routing is the ``route`` algorithm through the ordinary pipeline (plan, execute).  With
calibration data the routed modules are built in memory, attached to the base model, the router is
fitted, activation statistics are measured, and the result (plus an optional static export in
``OUT/static``) is written atomically with a model card.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, output_meta
from ..errors import LoraMergeError
from ..formats.routed import RoutedAdapter, RoutedOptions, iter_static
from ..options import MergeOptions
from ..pipeline import MergePlan, MergeRequest, execute, make_options, plan
from ..pipeline.output import SubOutput, write_output
from ..registry import AlgorithmParams
from .calibrate import CalibrationResult, calibrate, load_examples, make_batches, measure_activation
from .profile import fit_profiles, load_profile_data
from .runtime import attach, detach

STATIC_DIR = "static"


@dataclass
class RouteResult:
    out: Path
    modules: int
    units: int
    seconds: float
    config: dict[str, Any]
    calibration: CalibrationResult | None = None


def load_base_model(base: str | Path, device: torch.device) -> torch.nn.Module:
    """A transformers causal LM from a local folder, float32, frozen, in eval mode."""
    path = Path(base)
    if not (path / "config.json").is_file():
        raise LoraMergeError(f"«base» {base}: not a transformers model folder (no config.json)", field="base")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise LoraMergeError(f"«base» {base}: cannot load a causal language model ({str(e).splitlines()[0]})",
                             field="base") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


@dataclass(frozen=True)
class Calibration:
    """What fits a routed adapter to data; every part needs the base model (a transformers folder).

    ``calibrate_data``: JSONL examples to train the gate router on (``steps``, ``lr``, ``batch_size``,
    ``balance``, ``bias_rate``) and to measure each unit's activation on; ``profiles`` (hierarchical router):
    one JSONL of unlabeled examples per source, in source order; ``export_static``: also write
    ``OUT/static``, a PEFT adapter weighting each unit by its measured activation (needs ``calibrate_data``).
    """

    base: str | Path | None = None
    calibrate_data: str | Path | None = None
    profiles: Sequence[str | Path] | None = None
    steps: int = 200
    lr: float = 1e-2
    batch_size: int = 8
    max_length: int = 128
    balance: float = 0.01
    bias_rate: float = 1e-3
    export_static: bool = False


def _check_calibration(cal: Calibration, router: str, n_sources: int) -> None:
    if cal.export_static and cal.calibrate_data is None:
        raise LoraMergeError("«export_static» weights each unit by its activation frequency on data; "
                             "pass «calibrate_data» and «base»", field="export_static")
    if cal.calibrate_data is not None and cal.base is None:
        raise LoraMergeError("«calibrate_data» needs the base model: pass «base» (a transformers folder)", field="base")
    if cal.profiles is not None:
        if router != "hierarchical":
            raise LoraMergeError("profile files («profiles») are for the hierarchical router: pass «router» "
                                 "hierarchical", field="profiles")
        if cal.base is None:
            raise LoraMergeError("profile files («profiles») need the base model: pass «base» (a transformers folder)",
                                 field="base")
        if len(cal.profiles) != n_sources:
            raise LoraMergeError(f"got {len(cal.profiles)} profile files for {n_sources} adapters; give one per "
                                 "adapter, in the same order", field="profiles")
    for name in ("steps", "batch_size", "max_length"):
        v = getattr(cal, name)
        if v < (0 if name == "steps" else 1):
            raise LoraMergeError(f"«{name}» must be {'>= 0' if name == 'steps' else 'positive'} (got {v})", field=name)


def route(sources: Sequence[str | Path | Adapter], out: str | Path | None = None,
          params: Mapping[str, Any] | AlgorithmParams | None = None, weights: Sequence[float] | None = None,
          calibration: Calibration | None = None, options: MergeOptions | None = None) -> RouteResult:
    """Pool the units of ``sources`` and write a routed adapter to ``out`` (fitted to data with ``calibration``).

    ``params``: the ``route`` method's parameters (``top_k``, default half the largest input rank; ``router``, ``temperature``,
    ``top_k_pattern``, ``top_m``, ``mass``, ``evidence``), as for ``merge(..., method="route")``.  Run options
    (device, seed, force, missing, …) come from ``options``; ``out`` overrides ``options.out``.
    """
    t0 = time.perf_counter()
    opts = make_options(options, out=Path(out) if out is not None else (options.out if options else None))
    if opts.out is None:
        raise LoraMergeError("a routed adapter needs an output folder («out»)", field="out")
    cal = calibration or Calibration()
    values = params.model_dump() if isinstance(params, AlgorithmParams) else dict(params or {})
    _check_calibration(cal, str(values.get("router", "implicit")), len(sources))
    p = plan(MergeRequest(sources=list(sources), method="route", params=values,
                          weights=list(weights) if weights is not None else None, options=opts))
    if cal.calibrate_data is None and cal.profiles is None:
        res = execute(p)
        cfg = res.config
        return RouteResult(Path(opts.out), res.modules, sum(m["R"] for m in cfg["modules"].values()),
                           time.perf_counter() - t0, cfg)
    return _fit_and_write(p, cal, opts, t0)


def _fit_and_write(p: MergePlan, cal: Calibration, opts: MergeOptions, t0: float) -> RouteResult:
    """Calibrated routing: the routed modules in memory, fitted on the base model, then written with a card."""
    base, calibrate_data, profiles, max_length = cal.base, cal.calibrate_data, cal.profiles, cal.max_length
    steps, lr, balance, bias_rate, export_static = cal.steps, cal.lr, cal.balance, cal.bias_rate, cal.export_static
    batch_size = cal.batch_size
    out_path = Path(opts.out)
    model = load_base_model(base, p.device)  # type: ignore[arg-type]
    vocab = getattr(model.config, "vocab_size", None)
    batches = (make_batches(load_examples(calibrate_data, base=base, max_length=max_length, vocab_size=vocab),
                            batch_size) if calibrate_data is not None else [])
    profile_data = (load_profile_data(profiles, base=base, max_length=max_length, batch_size=batch_size,
                                      vocab_size=vocab) if profiles is not None else None)
    in_memory = replace(p, options=make_options(opts, out=None, push_to_hub=None))
    routed = RoutedAdapter(execute(in_memory).merged or {}, p.base_model, list(p.labels))
    handle = attach(model, routed)
    fit = None
    try:
        if profile_data is not None:
            fit_profiles(model, handle, profile_data, device=p.device, progress=opts.progress)
        if calibrate_data is not None:
            fit = calibrate(model, handle, batches, steps=steps, lr=lr, balance=balance, bias_rate=bias_rate,
                            seed=opts.seed, device=p.device, progress=opts.progress)
            measure_activation(model, handle, batches, p.device)
        fitted = handle.routed(routed)
    finally:
        detach(model)
    fitted.info = {}
    sections = []
    if profiles is not None:
        fitted.info["profiles"] = {"data": [str(f) for f in profiles], "max_length": max_length}
        sections.append(("Profiles", "Hierarchical router: each adapter's input Gaussians fitted on "
                                     + ", ".join(f"`{f}`" for f in profiles) + " (one file per adapter)."))
    if fit is not None:
        fitted.info["calibration"] = {"data": str(calibrate_data), "steps": steps, "lr": lr, "balance": balance,
                                      "bias_rate": bias_rate, "seed": opts.seed, "loss_before": fit.loss_before,
                                      "loss_after": fit.loss_after}
        sections.append(("Calibration", f"Router fitted on `{calibrate_data}` for {steps} steps: causal-LM loss "
                                        f"{fit.loss_before:.4f} → {fit.loss_after:.4f}."))
    also = []
    if export_static:
        sections.append(("Static export", f"`{STATIC_DIR}/` is a plain PEFT adapter: each unit weighted by "
                                          "its mean activation on the calibration data."))
        also.append(SubOutput(STATIC_DIR, "peft", iter_static(fitted.modules.items()),
                              output_meta(p.adapters).dtype, method="route-static"))
    written = replace(p, options=make_options(opts, push_to_hub=None), card_sections=tuple(sections))
    cfg = write_output(written, fitted.modules.items(), [], [], also=also,
                       format_options=RoutedOptions(info=fitted.info, sources=list(p.labels)))
    return RouteResult(out_path, len(fitted.modules), sum(m.rank for m in fitted.modules.values()),
                       time.perf_counter() - t0, cfg, fit)
