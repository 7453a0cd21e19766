"""``report.html``: one self-contained page (inline CSS, JS and SVG; no network) for a comparison report.

- ``table#results``: every row with per-task accuracy, normalised accuracy with its 95 % bootstrap
  interval and the paired difference to the best static merge; click a header to sort (numbers sort
  numerically, missing values last).
- ``svg#per-task-bars``: accuracy per task, one bar per variant (the dashed line: the task's own adapter).
- ``svg#quality-vs-rank``: normalised accuracy (with its interval) against the variant's rank (log₂ axis).
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from .report_text import ci_text, paired_text, variant_name

COLORS = {"base": "#888888", "individual": "#4c72b0", "reference": "#55a868", "merge": "#dd8452"}

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none}
td:first-child,th:first-child{text-align:left}
tr.kind-base td{background:#f6f6f6} tr.kind-individual td,tr.kind-reference td{background:#eef3fa}
tr.error td{color:#a00}
svg text{font-size:11px;font-family:system-ui,sans-serif}
.note{color:#555;font-size:13px;max-width:70em}
"""

JS = """
function sortTable(col){
  const table=document.getElementById('results'), body=table.tBodies[0];
  const th=table.tHead.rows[0].cells[col];
  const dir=th.dataset.dir==='asc'?'desc':'asc';
  for(const c of table.tHead.rows[0].cells){delete c.dataset.dir;}
  th.dataset.dir=dir;
  const rows=Array.from(body.rows);
  const key=r=>{const v=r.cells[col].dataset.value;return v===undefined||v===''?null:v;};
  rows.sort((a,b)=>{
    const x=key(a),y=key(b);
    if(x===null&&y===null)return 0; if(x===null)return 1; if(y===null)return -1;
    const nx=parseFloat(x),ny=parseFloat(y);
    const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
    return dir==='asc'?c:-c;
  });
  for(const r of rows)body.appendChild(r);
}
document.addEventListener('DOMContentLoaded',()=>{
  const cells=document.getElementById('results').tHead.rows[0].cells;
  for(let i=0;i<cells.length;i++)cells[i].addEventListener('click',()=>sortTable(i));
  document.body.dataset.ready='1';
});
"""


def _num(x: Any) -> str:
    return "" if x is None else repr(float(x))


def _table(report: dict[str, Any]) -> str:
    tasks = report["tasks"]
    head = ["variant", "kind", *tasks, "mean acc", "norm. acc", "95% CI", "Δ vs best static [95% CI]",
            "Δ vs best static of equal rank [95% CI]", "rel. error", "rank", "merge s"]
    out = ['<table id="results"><thead><tr>']
    out += [f"<th>{escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for r in report["rows"]:
        name = escape(variant_name(r))
        cls = f"kind-{r.get('kind', 'merge')}" + (" error" if "error" in r else "")
        cells = [f'<td data-value="{name}">{name}</td>', f'<td data-value="{escape(r.get("kind", ""))}">'
                 f'{escape(r.get("kind", ""))}</td>']
        if "error" in r:
            cells += ['<td data-value=""></td>'] * (len(head) - 3)
            cells.append(f'<td data-value="">failed: {escape(r["error"])}</td>')
        else:
            for t in tasks:
                acc = r["tasks"][t]["accuracy"] if t in r.get("tasks", {}) else None
                cells.append(f'<td data-value="{_num(acc)}">{"–" if acc is None else f"{acc:.3f}"}</td>')
            na = r.get("normalized_accuracy")
            ma = r.get("mean_accuracy")
            ci = r.get("norm_ci")
            p = r.get("paired")
            pr = r.get("paired_rank")
            fid = r.get("fidelity") or {}
            cells += [
                f'<td data-value="{_num(ma)}">{"–" if ma is None else f"{ma:.3f}"}</td>',
                f'<td data-value="{_num(na)}">{"–" if na is None else f"{na:.3f}"}</td>',
                f'<td data-value="{_num(ci[0] if ci else None)}">{ci_text(r)}</td>',
                f'<td data-value="{_num(p["diff"] if p else None)}">{escape(paired_text(r))}</td>',
                f'<td data-value="{_num(pr["diff"] if pr else None)}">'
                f'{escape(paired_text(r, "paired_rank", named=True))}</td>',
                f'<td data-value="{_num(fid.get("rel_error"))}">'
                f'{"–" if fid.get("rel_error") is None else format(fid["rel_error"], ".2e")}</td>',
                f'<td data-value="{_num(r.get("rank"))}">{r.get("rank") or "–"}</td>',
                f'<td data-value="{_num(r.get("merge_seconds"))}">'
                f'{"–" if r.get("merge_seconds") is None else format(r["merge_seconds"], ".2f")}</td>',
            ]
        out.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _bars(report: dict[str, Any]) -> str:
    """Small multiples: one panel per task, one horizontal bar per variant."""
    tasks = report["tasks"]
    rows = [r for r in report["rows"] if "tasks" in r]
    bar, gap, label_w, panel_w = 12, 3, 150, 170
    panel_h = len(rows) * (bar + gap) + 30
    width = label_w + len(tasks) * (panel_w + 10) + 10
    parts = [f'<svg id="per-task-bars" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel_h + 10}" '
             f'role="img" aria-label="accuracy per task">']
    for i, r in enumerate(rows):
        y = 25 + i * (bar + gap) + bar - 2
        parts.append(f'<text x="{label_w - 5}" y="{y}" text-anchor="end">{escape(variant_name(r))}</text>')
    own = report.get("own", {})
    by_name = {r["variant"]: r for r in rows}
    for j, t in enumerate(tasks):
        x0 = label_w + j * (panel_w + 10)
        parts.append(f'<text x="{x0 + panel_w / 2}" y="14" text-anchor="middle" font-weight="bold">{escape(t)}</text>')
        parts.append(f'<rect x="{x0}" y="20" width="{panel_w}" height="{panel_h - 25}" fill="none" stroke="#ddd"/>')
        for i, r in enumerate(rows):
            acc = r["tasks"].get(t, {}).get("accuracy")
            if acc is None:
                continue
            y = 25 + i * (bar + gap)
            parts.append(f'<rect class="bar" x="{x0}" y="{y}" width="{acc * panel_w:.1f}" height="{bar}" '
                         f'fill="{COLORS.get(r.get("kind", "merge"), "#dd8452")}">'
                         f'<title>{escape(variant_name(r))} · {escape(t)}: {acc:.3f}</title></rect>')
        ref = by_name.get(own.get(t, ""), {}).get("tasks", {}).get(t, {}).get("accuracy")
        if ref is not None:
            xr = x0 + ref * panel_w
            parts.append(f'<line x1="{xr:.1f}" y1="20" x2="{xr:.1f}" y2="{panel_h - 5}" stroke="#000" '
                         'stroke-dasharray="3,2"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def _rank_plot(report: dict[str, Any]) -> str:
    """Scatter of normalised accuracy (with its 95 % interval) against rank on a log₂ axis."""
    pts = [r for r in report["rows"] if r.get("normalized_accuracy") is not None and r.get("rank")]
    w, h, ml, mb, mt, mr = 640, 380, 55, 40, 15, 170
    parts = [f'<svg id="quality-vs-rank" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             'aria-label="normalised accuracy against rank">']
    if not pts:
        parts.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle">no ranked rows</text></svg>')
        return "\n".join(parts)
    ranks = [math.log2(r["rank"]) for r in pts]
    lo_v = [(r.get("norm_ci") or [r["normalized_accuracy"]] * 2)[0] for r in pts]
    hi_v = [(r.get("norm_ci") or [r["normalized_accuracy"]] * 2)[1] for r in pts]
    xmin, xmax = min(ranks) - 0.5, max(ranks) + 0.5
    ymin, ymax = min(lo_v) - 0.02, max(hi_v) + 0.02
    px = lambda v: ml + (v - xmin) / (xmax - xmin) * (w - ml - mr)  # noqa: E731
    py = lambda v: mt + (ymax - v) / (ymax - ymin) * (h - mt - mb)  # noqa: E731
    parts.append(f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="#000"/>')
    parts.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="#000"/>')
    for e in range(math.ceil(xmin), math.floor(xmax) + 1):
        parts.append(f'<text x="{px(e):.1f}" y="{h - mb + 15}" text-anchor="middle">{2 ** e}</text>')
    for k in range(6):
        v = ymin + k * (ymax - ymin) / 5
        parts.append(f'<text x="{ml - 5}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    parts.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 5}" text-anchor="middle">rank (log₂ axis)</text>')
    parts.append(f'<text x="12" y="{(mt + h - mb) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(mt + h - mb) / 2})">normalised accuracy</text>')
    for r, x, lo, hi in zip(pts, ranks, lo_v, hi_v):
        c = COLORS.get(r.get("kind", "merge"), "#dd8452")
        name = escape(variant_name(r))
        parts.append(f'<line x1="{px(x):.1f}" y1="{py(lo):.1f}" x2="{px(x):.1f}" y2="{py(hi):.1f}" stroke="{c}"/>')
        parts.append(f'<circle class="point" cx="{px(x):.1f}" cy="{py(r["normalized_accuracy"]):.1f}" r="4" '
                     f'fill="{c}"><title>{name}: {r["normalized_accuracy"]:.3f} {ci_text(r)}, rank {r["rank"]}'
                     '</title></circle>')
        parts.append(f'<text x="{px(x) + 6:.1f}" y="{py(r["normalized_accuracy"]) + 4:.1f}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def html(report: dict[str, Any]) -> str:
    """The whole page as one string (UTF-8, no external resources)."""
    cfg = report["config"]
    best = sorted({r["paired"]["vs"] for r in report["rows"] if r.get("paired")})
    note = (f"Base model <code>{escape(str(cfg['base']))}</code>, device <code>{escape(report['device'])}</code>, "
            f"{cfg['examples']} test examples per task, seed {cfg['seed']}. Normalised accuracy = accuracy / the "
            "task's own adapter's accuracy, averaged over tasks. 95% CI: percentile bootstrap over the test "
            f"examples ({cfg.get('bootstrap', 0)} resamples); Δ: paired difference to the best static merge "
            f"({escape(', '.join(best) or 'none')}) on the same resamples. <b>*</b> = tuned: the best of a grid "
            "chosen on a validation slice of the train split, never on these test examples.")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>loramerge method comparison</title>", f"<style>{CSS}</style>", f"<script>{JS}</script>",
        "</head><body>", "<h1>Method comparison</h1>", f'<p class="note">{note}</p>',
        "<h2>Results</h2>", _table(report), "<h2>Accuracy per task</h2>", _bars(report),
        "<h2>Quality against rank</h2>", _rank_plot(report), "</body></html>", ""])
