"""The comparison report: a markdown table, a JSON dump, a PNG (accuracy heat map + normalised bars) and a
self-contained HTML page (:mod:`.report_html`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report_html import html
from .report_text import ci_text, harm_text, mean_text, number, paired_text, variant_name


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) shared by report.md and the terminal table."""
    tasks = report["tasks"]
    head = ["variant", *tasks, "mean acc", "norm. acc", "95% CI", "Δ vs best static [95% CI]",
            "Δ vs best static of equal rank [95% CI]", "rel. error", "energy", "rank", "merge s"]
    ref = report["config"].get("reference_row", "linear")
    harmed = any(r.get("harm") for r in report["rows"])
    base_harm = next((r.get("harm") or {} for r in report["rows"] if r.get("kind") == "base"), {})
    extra = [f"Δ mean acc vs {ref} [95% CI]"] + (["harm: ppl ×base", "harm: unseen Δ"] if harmed else [])
    head = head[:len(tasks) + 3] + extra + head[len(tasks) + 3:]
    rows = []
    for r in report["rows"]:
        if "error" in r:
            rows.append([variant_name(r), *(["–"] * (len(tasks) + 8 + len(extra))), f"failed: {r['error']}"])
            continue
        fid = r.get("fidelity") or {}
        accs = [number(r["tasks"][t]["accuracy"]) if t in r["tasks"] else "–" for t in tasks]
        more = [mean_text(r)] + (harm_text(r.get("harm") or {}, base_harm) if harmed else [])
        rows.append([
            variant_name(r), *accs, number(r.get("mean_accuracy")), *more,
            number(r.get("normalized_accuracy")), ci_text(r), paired_text(r),
            paired_text(r, "paired_rank", named=True),
            number(fid.get("rel_error"), ".2e") if fid else "–",
            number(fid.get("energy"), ".3f") if fid else "–", str(r.get("rank") or "–"), number(r.get("merge_seconds"), ".2f"),
        ])
    return head, rows


def markdown(report: dict[str, Any]) -> str:
    head, rows = table_rows(report)
    cfg = report["config"]
    lines = [
        "# Method comparison", "",
        f"Base model `{cfg['base']}`, device `{report['device']}`, {cfg['examples']} test examples per task, "
        f"merge weights {cfg['weights'] or 'uniform 1/n'} (unless a row says otherwise), seed {cfg['seed']}.", "",
        "Accuracy per task (label-word next-token prediction), mean accuracy, normalised accuracy "
        "(accuracy / the individual adapter's accuracy on its own task, averaged over tasks), fidelity "
        "against Σ wᵢ ΔWᵢ (relative error, energy retained), the merged rank and the merge wall time. "
        f"95% CI: percentile bootstrap ({cfg.get('bootstrap', 0)} resamples of the test examples, per task); "
        f"Δ: paired difference to the best static merge ({_best(report)}) on the same resamples; "
        "Δ of equal rank: the same against the best static merge whose output rank equals the row's. "
        "`*`: tuned, the best of a grid chosen on a validation slice of the train split "
        f"({cfg.get('validation', '–')} examples per task), never on these test examples.", "",
        "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    merges = [r for r in report["rows"] if r.get("kind") == "merge" and "fidelity" in r]
    if merges:
        lines += ["", "Per-input retention of each merge (cos(ΔW_merged, ΔWᵢ) / projection ⟨ΔW_merged, ΔWᵢ⟩/‖ΔWᵢ‖²):", "",
                  "| merge | " + " | ".join(report["config"]["adapters"]) + " |",
                  "|---|" + "|".join("---" for _ in report["config"]["adapters"]) + "|"]
        for r in merges:
            f = r["fidelity"]
            cells = [f"{c:.3f} / {p:.3f}" for c, p in zip(f["cos"], f["projection"])]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _best(report: dict[str, Any]) -> str:
    vs = {r["paired"]["vs"] for r in report["rows"] if r.get("paired")}
    return ", ".join(sorted(vs)) or "none"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = report["tasks"]
    rows = [r for r in report["rows"] if "tasks" in r]
    acc = np.array([[r["tasks"][t]["accuracy"] if t in r["tasks"] else np.nan for t in tasks] for r in rows])
    names = [variant_name(r) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 2), gridspec_kw={"width_ratios": [3, 2]})
    im = ax1.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax1.set_xticks(range(len(tasks)), tasks)
    ax1.set_yticks(range(len(rows)), names)
    for i in range(len(rows)):
        for j in range(len(tasks)):
            if np.isnan(acc[i, j]):
                continue
            ax1.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", color="w" if acc[i, j] < 0.6 else "k", fontsize=8)
    ax1.set_title("accuracy per task")
    fig.colorbar(im, ax=ax1, fraction=0.04)
    norm = [r.get("normalized_accuracy") or 0.0 for r in rows]
    colors = ["#999" if r["kind"] == "base" else "#dd8452" if r["kind"] == "merge" else "#4c72b0" for r in rows]
    ax2.barh(range(len(rows)), norm, color=colors)
    ax2.set_yticks(range(len(rows)), names)
    ax2.invert_yaxis()
    ax2.axvline(1.0, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("normalised accuracy (vs individual adapters)")
    ax2.set_title(f"{report['config']['base']} · {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(markdown(report))
    plot(report, folder / "report.png")
    (folder / "report.html").write_text(html(report), encoding="utf-8")
