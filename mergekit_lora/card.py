"""Model cards (README.md) for merged adapters: front matter the Hub reads, and the merge's story."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class SourceInfo:
    """One input as the card lists it."""

    source: str
    weight: float
    revision: str | None = None
    rank: str | None = None


@dataclass
class CardInfo:
    method: str
    params: dict[str, Any]
    sources: list[SourceInfo]
    base_model: str | None
    library_name: str = "peft"
    seed: int | None = None
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    extra_sections: list[tuple[str, str]] = field(default_factory=list)
    recipe: str | None = None


def render_card(info: CardInfo) -> str:
    front: dict[str, Any] = {}
    if info.base_model:
        front["base_model"] = info.base_model
        front["base_model_relation"] = "adapter"
    front["library_name"] = info.library_name
    front["tags"] = ["lora", "mergekit-lora", info.method]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# Merged LoRA ({info.method})", ""]
    lines += [f"This adapter was produced by mergekit-lora (`loramerge`) "
              f"with the `{info.method}` method"
              + (f" on top of `{info.base_model}`." if info.base_model else "."), ""]
    lines += ["## Inputs", "", "| # | source | revision | weight | rank |", "|---|---|---|---|---|"]
    for i, s in enumerate(info.sources):
        lines.append(f"| {i} | `{s.source}` | {s.revision or '-'} | {s.weight:g} | {s.rank or '-'} |")
    lines += ["", "## Method", "", f"- method: `{info.method}`"]
    for k, v in sorted(info.params.items()):
        if v is not None:  # an unset optional parameter (e.g. linear without rank) is not a setting
            lines.append(f"- {k}: `{v}`")
    if info.seed is not None:
        lines.append(f"- seed: `{info.seed}`")
    if info.fidelity:
        lines += ["", "## Fidelity", "",
                  "Relative error ‖ΔW_merged − Σ wᵢ ΔWᵢ‖ / ‖Σ wᵢ ΔWᵢ‖ and retained energy, computed in factor space.",
                  "", "| module group | modules | rel. error | energy ratio |", "|---|---|---|---|"]
        for g, v in info.fidelity.items():
            if g == "overall":
                continue
            lines.append(f"| `{g}` | {v['modules']} | {v['rel_error']:.3e} | {v['energy_ratio']:.4f} |")
        if "overall" in info.fidelity:
            v = info.fidelity["overall"]
            lines.append(f"| **overall** | {v['modules']} | {v['rel_error']:.3e} | {v['energy_ratio']:.4f} |")
    for title, body in info.extra_sections:
        lines += ["", f"## {title}", "", body.rstrip()]
    if info.recipe:
        lines += ["", "## Recipe", "", "```yaml", info.recipe.rstrip(), "```"]
    if info.library_name == "mergekit-lora":  # a routed adapter: PEFT cannot run it
        lines += ["", "## Usage", "", "```python", "from mergekit_lora.routing import load_routed",
                  "from mergekit_lora.runtime import attach", "",
                  "attach(base_model, load_routed(\"path/to/this/adapter\"))", "```", ""]
        return "\n".join(lines)
    lines += ["", "## Usage", "", "```python", "from peft import PeftModel",
              "model = PeftModel.from_pretrained(base_model, \"path/to/this/adapter\")", "```", ""]
    return "\n".join(lines)
