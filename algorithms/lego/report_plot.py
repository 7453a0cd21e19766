"""``lego_report.png``: who clusters with whom, and how tight the clusters are, per module group.

One row per module group (``layers.*.self_attn.q_proj`` …, at most 8): on the left the input × cluster
heatmap of the group's first module (how many of each input's units fell into each cluster, clusters
sorted by size), on the right the spread of the member-to-centroid cosines over all the group's
clusters (mean and minimum per cluster).  matplotlib's object API (no global state), PNG bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from mergekit_lora.names import module_group

from .report import ModuleRecord

MAX_GROUPS = 8


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
        first = recs[0]
        order = sorted(range(len(first.sizes)), key=lambda j: -first.sizes[j])
        inputs = sorted(first.input_by_cluster)
        grid = [[first.input_by_cluster[i][j] for j in order] for i in inputs]
        im = left.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        left.set_yticks(range(len(inputs)), [labels[i] if i < len(labels) else str(i) for i in inputs], fontsize=7)
        left.set_xlabel("cluster (largest first)", fontsize=7)
        left.set_title(f"{group}: units per input × cluster ({first.name})", fontsize=8)
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
