"""Write the suite v2 scenario configs (``evals/suite/v2-*.yaml``) for ``loramerge eval compare``.

    python evals/suite/scenarios.py            # rewrites the YAML files next to this script

Scenarios (each a row group of evals/RESULTS.md):
  a   all 8 task adapters (r = 8) merged;
  b2  fixed pairs, b4  fixed quadruples (r = 8);
  c   heterogeneous ranks: script r=4, polarity r=8, region r=16, subject r=16 merged together
      (c3: the first three only);
  d   pruning: one r = 16 adapter re-ranked to 8 and 4 by ``lego`` and ``svd`` (the r = 8 / r = 4
      adapters trained on the same task are reference rows, not merged).
Every method runs at its documented defaults (weights 1/n, density 0.5, output rank / k / top-k = the
largest input rank r) and, in the ``-tuned`` configs, also at the best of a small grid
(weights ∈ {1/n, 2/n, 1}; density ∈ {0.3, 0.5, 0.7}; k, top-k ∈ {r, 2r, 4r}) chosen on a validation
slice of the train split (``validation`` examples per task), never on the test examples.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).parent
EX = "../../examples/suite"
OLD = ["topic", "sentiment", "genre", "language"]
NEW = ["script", "polarity", "region", "subject"]
WEIGHTS = ["1/n", "2/n", 1]
DENSITIES = [0.3, 0.5, 0.7]
MULTIPLES = ["r", "2r", "4r"]


def methods(r: int, *, tuned: bool) -> list:
    """Every method at its defaults (output rank r), then (tuned) the grid rows."""
    out: list = [
        {"method": "linear"}, {"method": "cat"}, {"method": "svd"},
        {"method": "ties", "params": {"density": 0.5}}, {"method": "dare_linear", "params": {"density": 0.5}},
        {"method": "dare_ties", "params": {"density": 0.5}}, {"method": "magnitude_prune", "params": {"density": 0.5}},
        {"method": "lego", "params": {"k": r}}, {"method": "route", "params": {"top_k": r}},
    ]
    if tuned:
        out += [
            {"method": "linear", "label": "linear-tuned", "grid": {"weight": WEIGHTS}},
            {"method": "svd", "label": "svd-tuned", "grid": {"weight": WEIGHTS}},
            *({"method": m, "label": f"{m}-tuned", "grid": {"weight": WEIGHTS, "density": DENSITIES}}
              for m in ("ties", "dare_linear", "dare_ties", "magnitude_prune")),
            {"method": "lego", "label": "lego-tuned", "grid": {"weight": WEIGHTS, "k": MULTIPLES}},
            {"method": "route", "label": "route-tuned", "grid": {"weight": WEIGHTS, "top_k": MULTIPLES}},
        ]
    return out


def config(adapters: dict[str, str], r: int, *, tuned: bool, references: dict[str, str] | None = None,
           method_list: list | None = None) -> dict:
    cfg = {"base": "smollm2-135m", "adapters": adapters, "tasks": [t for t in adapters],
           "methods": method_list if method_list is not None else methods(r, tuned=tuned),
           "examples": 300, "validation": 40, "batch_size": 32, "individual": "own", "bootstrap": 1000,
           "device": "auto", "threads": 1, "seed": 0}
    if references:
        cfg["references"] = references
    return cfg


def scenarios() -> dict[str, tuple[str, dict]]:
    r8 = lambda ts: {t: f"{EX}/{t}" for t in ts}  # noqa: E731
    out: dict[str, tuple[str, dict]] = {}
    for tuned in (False, True):
        sfx = "-tuned" if tuned else ""
        out[f"v2-a{sfx}"] = ("(a) all 8 task adapters, r = 8", config(r8(OLD + NEW), 8, tuned=tuned))
        for i, pair in enumerate((["topic", "script"], ["sentiment", "polarity"], ["language", "region"]), 1):
            out[f"v2-b2-{i}{sfx}"] = (f"(b) pair {i}: {' + '.join(pair)}, r = 8", config(r8(pair), 8, tuned=tuned))
        for i, quad in enumerate((NEW, OLD, ["topic", "polarity", "language", "script"]), 1):
            out[f"v2-b4-{i}{sfx}"] = (f"(b) four tasks {i}: {', '.join(quad)}, r = 8", config(r8(quad), 8, tuned=tuned))
        out[f"v2-b3{sfx}"] = ("(b) three tasks: script, polarity, region, all r = 8 (the equal-rank twin of v2-c3)",
                              config(r8(["script", "polarity", "region"]), 8, tuned=tuned))
        hetero = {"script": f"{EX}/r4/script", "polarity": f"{EX}/polarity", "region": f"{EX}/r16/region",
                  "subject": f"{EX}/r16/subject"}
        out[f"v2-c{sfx}"] = ("(c) heterogeneous ranks: script r4, polarity r8, region r16, subject r16 "
                             "(compare with v2-b4-1: the same tasks, all r8)", config(hetero, 16, tuned=tuned))
        three = {t: hetero[t] for t in ("script", "polarity", "region")}
        out[f"v2-c3{sfx}"] = ("(c) heterogeneous ranks, three tasks: script r4, polarity r8, region r16",
                              config(three, 16, tuned=tuned))
    core = [m for m in methods(16, tuned=False) if m["method"] in ("linear", "svd", "ties", "lego", "route")]
    out["v2-c3-core"] = ("(c) heterogeneous ranks, three tasks, five methods (linear, svd, ties, lego, route: "
                         "the subset that fit the CPU time of 2026-11-26; cat = linear exactly)",
                         config(out["v2-c3"][1]["adapters"], 16, tuned=False, method_list=core))
    for task in ("region", "polarity"):
        prune = [{"method": m, "label": f"{m}-{k}", "params": {p: k}}
                 for k in (8, 4) for m, p in (("svd", "rank"), ("lego", "k"))]
        out[f"v2-d-{task}"] = (
            f"(d) pruning: the r = 16 {task} adapter re-ranked to 8 and 4 by svd and lego; references: the "
            f"r = 8 and r = 4 adapters trained on {task}",
            config({task: f"{EX}/r16/{task}"}, 16, tuned=False, method_list=prune,
                   references={f"{task}-trained-r8": f"{EX}/{task}", f"{task}-trained-r4": f"{EX}/r4/{task}"}))
    return out


# ------------------------------------------------------------------------------------------------ suite v3
# Held-out scenarios of issue 22: every method at the defaults chosen by select_defaults.py on the
# selection scenarios (sel-b3, sel-c, sel-old3, validation slices only); these played no part in that choice.
GEN_2024 = ["linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "lego"]
GEN_2025 = ["knots_ties", "knots_dare_ties", "tsv", "iso_c", "iso_cts"]
TUNED = ["ties", "lego", "knots_ties", "tsv", "iso_c"]
TUNE_SCALES = ["average", "1.5*average", "2*average", "3*average", "4*average"]


def v3_methods() -> list:
    """Every method at its defaults (``scale: auto``, no parameters), core-space TIES, route, then the
    strength tuned on the validation slice for the strongest static methods of each generation."""
    rows: list = [{"method": m} for m in GEN_2024]
    rows.append({"method": "ties", "label": "ties-core", "params": {"space": "core"}})
    rows += [{"method": m} for m in GEN_2025]
    rows.append({"method": "route"})
    rows.append({"method": "linear", "label": "linear-tuned", "grid": {"scale": ["none", "1.5*average", "2*average"]}})
    rows += [{"method": m, "label": f"{m}-tuned", "grid": {"scale": TUNE_SCALES}} for m in TUNED]
    return rows


def v3_scenarios() -> dict[str, tuple[str, dict]]:
    r8 = lambda ts: {t: f"{EX}/{t}" for t in ts}  # noqa: E731
    seven = ["sentiment", "genre", "language", "script", "polarity", "region", "subject"]
    fragile = ["sentiment", "script", "region", "subject"]
    defaults_only = [m for m in v3_methods() if "grid" not in m]
    out = {
        "v3-pair": ("held out: a pair, language + region, r = 8 (every method at its defaults)",
                    {**config(r8(["language", "region"]), 8, tuned=False, method_list=defaults_only),
                     "harm_passages": 48}),
        "v3-seven": ("held out: seven task adapters (every task but topic), r = 8",
                     {**config(r8(seven), 8, tuned=False, method_list=v3_methods()), "harm_passages": 48}),
        "v3-fragile": ("held out, fragile: region (base 0.57) falls below the base under full-strength merges; "
                       "sentiment, script, region, subject, r = 8",
                       {**config(r8(fragile), 8, tuned=False, method_list=v3_methods()), "harm_passages": 48,
                        "unseen": ["polarity", "language"]}),
    }
    return out


def main() -> None:
    for name, (title, cfg) in {**scenarios(), **v3_scenarios()}.items():
        head = (f"# Suite v2 scenario {title}.\n# Generated by evals/suite/scenarios.py (edit there).  Run:\n"
                f"#   loramerge eval compare evals/suite/{name}.yaml -o out/{name}\n")
        (HERE / f"{name}.yaml").write_text(head + yaml.safe_dump(cfg, sort_keys=False, width=110))
    print(f"wrote {len(scenarios()) + len(v3_scenarios())} configs to {HERE}")


if __name__ == "__main__":
    main()
