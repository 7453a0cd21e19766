"""``lego_report.png``: who clusters with whom, and how tight the clusters are, per module group.

One row per module group (``layers.*.self_attn.q_proj`` …, at most 8): on the left the input × cluster
heatmaps of every module of the group side by side, one block per layer (how many of each input's units
fell into each cluster, clusters sorted by size within a block), on the right the spread of the member-to-centroid cosines over all the group's
clusters (mean and minimum per cluster).  matplotlib's object API (no global state), PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from mergekit_lora.names import layer_index, module_group

from .report import ModuleRecord

MAX_GROUPS = 8


def layer_grid(recs: Sequence[ModuleRecord]) -> tuple[list[list[int]], list[int], list[int]]:
    """Every module's input × cluster counts side by side (clusters largest first within a module): the grid
    [inputs][Σ k], the input ids, and the column where each module starts (plus the end)."""
    inputs = sorted({i for r in recs for i in r.input_by_cluster})
    grid: list[list[int]] = [[] for _ in inputs]
    bounds = [0]
    for r in recs:
        order = sorted(range(len(r.sizes)), key=lambda j: -r.sizes[j])
        for row, i in zip(grid, inputs):
            counts = r.input_by_cluster.get(i, [0] * len(r.sizes))
            row.extend(counts[j] for j in order)
        bounds.append(bounds[-1] + len(order))
    return grid, inputs, bounds


def _layer(name: str) -> str:
    i = layer_index(name)
    return str(i) if i is not None else name.rsplit(".", 1)[-1]


def report_png(records: Sequence[ModuleRecord], labels: Sequence[str]) -> bytes:
    """The picture as PNG bytes (records need the ``--report`` details: sizes, input_by_cluster, cosines)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[ModuleRecord]] = {}
    for r in records:
        groups.setdefault(module_group(r.name), []).append(r)
    shown = list(groups.items())[:MAX_GROUPS]
    fig = Figure(figsize=(11, 2.6 * len(shown) + 0.6), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shown), 2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for (group, recs), (left, right) in zip(shown, axes):
        recs = sorted(recs, key=lambda r: (layer_index(r.name) is None, layer_index(r.name) or 0))
        grid, inputs, bounds = layer_grid(recs)
        im = left.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        left.set_yticks(range(len(inputs)), [labels[i] if i < len(labels) else str(i) for i in inputs], fontsize=7)
        for x in bounds[1:-1]:
            left.axvline(x - 0.5, color="w", lw=0.6)
        step = max(1, len(recs) // 16)  # at most ~16 tick labels
        left.set_xticks([(a + b - 1) / 2 for a, b in zip(bounds[:-1:step], bounds[1::step])],
                        [_layer(r.name) for r in recs[::step]], fontsize=6)
        left.set_xlabel("module (layer); within each, clusters largest first", fontsize=7)
        left.set_title(f"{group}: units per input × cluster, all {len(recs)} modules", fontsize=8)
        fig.colorbar(im, ax=left, fraction=0.03)
        means = [c for r in recs for c, s in zip(r.cos_mean, r.sizes) if s]
        mins = [c for r in recs for c, s in zip(r.cos_min, r.sizes) if s]
        right.hist([means, mins], bins=20, range=(-1, 1), label=["mean", "min"], color=["#4c72b0", "#dd8452"])
        right.set_title(f"member-to-centroid cosine, {len(recs)} modules", fontsize=8)
        right.legend(fontsize=7)
        right.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
