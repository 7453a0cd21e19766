"""``eval fidelity --plot``: relative error and energy retained per layer and module type, as two heatmaps.

Rows are module types (the last name part: ``q_proj``, ``down_proj``), columns are layers (the first
number in the module name, ``model.layers.3.…`` -> 3); modules without a layer number (``lm_head``) go to
a last column "other".  Uses matplotlib's object API (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from mergekit_lora.errors import LoraMergeError

from .fidelity import FidelityReport

_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class FidelityGrid:
    """``rel_error[t][l]`` / ``energy[t][l]`` for module type ``types[t]`` at layer ``layers[l]`` (NaN: no module;
    several modules in one cell, e.g. two towers: error from summed squares, energy as the ratio of sums)."""

    types: list[str]
    layers: list[str]
    rel_error: list[list[float]]
    energy: list[list[float]]


def _split(name: str) -> tuple[str, str]:
    m = _LAYER.search(name)
    return name.rsplit(".", 1)[-1], (m.group(1) if m else "other")


def fidelity_grid(report: FidelityReport) -> FidelityGrid:
    """The per-module rows of ``report`` arranged as module type × layer."""
    cells: dict[tuple[str, str], list[float]] = {}
    for r in report.modules:
        acc = cells.setdefault(_split(r.name), [0.0, 0.0, 0.0])
        acc[0] += r.error_sq
        acc[1] += r.target_sq
        acc[2] += r.merged_sq
    types = sorted({t for t, _ in cells})
    nums = sorted({int(layer) for _, layer in cells if layer != "other"})
    layers = [str(n) for n in nums] + (["other"] if any(layer == "other" for _, layer in cells) else [])
    nan = math.nan
    rel = [[nan] * len(layers) for _ in types]
    en = [[nan] * len(layers) for _ in types]
    for (t, layer), (e2, t2, m2) in cells.items():
        i, j = types.index(t), layers.index(layer)
        rel[i][j] = math.sqrt(e2 / t2) if t2 > 0 else (0.0 if e2 == 0 else math.inf)
        en[i][j] = m2 / t2 if t2 > 0 else (1.0 if m2 == 0 else math.inf)
    return FidelityGrid(types, layers, rel, en)


def plot_fidelity(report: FidelityReport, out: str | Path, title: str | None = None) -> Path:
    """Write a PNG with two heatmaps (relative error, energy retained) over module type × layer."""
    try:
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError:
        raise LoraMergeError("the fidelity plot needs matplotlib; install it with "
                             "`pip install -e '.[eval]'` in the clone") from None
    g = fidelity_grid(report)
    if not g.types:
        raise LoraMergeError("the fidelity report has no modules to plot")
    rel = np.ma.masked_invalid(np.array(g.rel_error, dtype=float))
    en = np.ma.masked_invalid(np.array(g.energy, dtype=float))
    width = min(4 + 0.35 * len(g.layers), 30)
    height = 1.6 + 0.45 * len(g.types)
    fig = Figure(figsize=(width, 2 * height + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, 1)
    top = float(rel.max()) if rel.count() else 1.0
    # energy: a diverging map centred on 1 (white = kept, blue = lost, red = amplified), symmetric limits
    dev = max([abs(float(en.max()) - 1.0), abs(float(en.min()) - 1.0)] if en.count() else [0.0])
    dev = min(max(dev, 1e-9), 1e6)
    panels = [(axes[0], rel, "relative error ‖ΔW − Σ wᵢΔWᵢ‖ / ‖Σ wᵢΔWᵢ‖", "viridis", dict(vmin=0.0, vmax=max(top, 1e-12))),
              (axes[1], en, "energy retained ‖ΔW‖² / ‖Σ wᵢΔWᵢ‖²  (1 = kept)", "RdBu_r",
               dict(vmin=1.0 - dev, vmax=1.0 + dev))]
    for ax, data, label, cmap, scale in panels:
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", **scale)
        ax.set_title(label, fontsize=10, loc="left")
        ax.set_yticks(range(len(g.types)), g.types, fontsize=8)
        step = max(1, len(g.layers) // 40)
        ax.set_xticks(range(0, len(g.layers), step), g.layers[::step], fontsize=7)
        ax.set_xlabel("layer")
        fig.colorbar(im, ax=ax, shrink=0.9)
    o = report.overall
    fig.suptitle(title or f"fidelity: overall rel. error {o['rel_error']:.3g}, energy {o['energy']:.3g} "
                 f"({o['modules']} modules)", fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": None})
    return out
