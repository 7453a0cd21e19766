"""What a LoRA-LEGO merge did, per module: the card's reweighting table and the ``--report`` files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mergekit_lora.fidelity import module_group

from .reweight import REWEIGHTS


@dataclass
class ModuleRecord:
    name: str
    pool: int
    k: int
    exact: bool
    target_norm2: float
    err2: dict[str, float]
    sizes: list[int] = field(default_factory=list)
    input_by_cluster: dict[int, list[int]] = field(default_factory=dict)
    cos_mean: list[float] = field(default_factory=list)
    cos_min: list[float] = field(default_factory=list)


def fidelity_section(records: list[ModuleRecord], chosen: str) -> tuple[str, str]:
    """Per module group: relative error of each reweighting option (the chosen one in bold)."""
    acc: dict[str, list[float]] = {}
    for r in records:
        for key in (module_group(r.name), "overall"):
            a = acc.setdefault(key, [0.0] * (len(REWEIGHTS) + 1))
            a[0] += r.target_norm2
            for i, opt in enumerate(REWEIGHTS):
                a[i + 1] += r.err2[opt]
    if "overall" in acc:
        acc["overall"] = acc.pop("overall")
    head = " | ".join(f"**{o}**" if o == chosen else o for o in REWEIGHTS)
    lines = ["Relative error ‖ΔW − T‖ / ‖T‖ against the weighted average T = Σ wᵢ ΔWᵢ / Σ |wᵢ| (LoRA-LEGO reads "
             "weights as relative) of each reweighting option on the same clusters "
             f"(factor space; used here: `{chosen}`). `lsq` is the least-squares optimum of this error; "
             "`paper` targets output scale, not this error.", "",
             f"| module group | {head} |", "|---|" + "---|" * len(REWEIGHTS)]
    for g, a in acc.items():
        t2 = a[0]
        vals = [((e / t2) ** 0.5 if t2 > 0 else 0.0) for e in a[1:]]
        name = "**overall**" if g == "overall" else f"`{g}`"
        lines.append(f"| {name} | " + " | ".join(f"{v:.3e}" for v in vals) + " |")
    exact = sum(r.exact for r in records)
    if exact:
        lines += ["", f"{exact} of {len(records)} modules had k ≥ pooled rank: every unit was its own cluster "
                      "(`lsq` is then exact; `none` is the pooled sum, `paper` that × √(r/k))."]
    return "LoRA-LEGO reweighting", "\n".join(lines)


def report_files(records: list[ModuleRecord], labels: list[str], meta: dict) -> dict[str, str]:
    """``lego_report.json`` (everything) and ``lego_report.md`` (one line per module)."""
    mods = {}
    for r in records:
        t = r.target_norm2
        mods[r.name] = {
            "pool": r.pool, "k": r.k, "exact": r.exact, "sizes": r.sizes,
            "input_by_cluster": {labels[i] if i < len(labels) else str(i): row
                                 for i, row in sorted(r.input_by_cluster.items())},
            "cos_to_centroid_mean": [round(c, 6) for c in r.cos_mean],
            "cos_to_centroid_min": [round(c, 6) for c in r.cos_min],
            "rel_error": {o: ((r.err2[o] / t) ** 0.5 if t > 0 else 0.0) for o in REWEIGHTS},
        }
    doc = {"method": "lego", **meta, "inputs": labels, "modules": mods}
    md = ["# LoRA-LEGO cluster report", "",
          f"inputs: {', '.join(f'{i}: `{x}`' for i, x in enumerate(labels))}; "
          + ", ".join(f"{k}: `{v}`" for k, v in meta.items()), "",
          "Cosine is between each unit vector [b;a] and its cluster centroid; mixed = clusters holding units "
          "of more than one input.", "",
          "| module | pool | k | largest | singletons | empty | mixed | mean cos | min cos | rel. error |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mixed = sum(1 for j in range(len(r.sizes)) if sum(1 for row in r.input_by_cluster.values() if row[j]) > 1)
        nonempty = [c for c, s in zip(r.cos_mean, r.sizes) if s]
        mins = [c for c, s in zip(r.cos_min, r.sizes) if s]
        err = mods[r.name]["rel_error"][meta.get("reweight", "paper")]
        md.append(f"| `{r.name}` | {r.pool} | {r.k} | {max(r.sizes, default=0)} | {r.sizes.count(1)} | "
                  f"{r.sizes.count(0)} | {mixed} | {sum(nonempty) / max(len(nonempty), 1):.3f} | "
                  f"{min(mins, default=1.0):.3f} | {err:.3e} |")
    return {"lego_report.json": json.dumps(doc, indent=1) + "\n", "lego_report.md": "\n".join(md) + "\n"}
