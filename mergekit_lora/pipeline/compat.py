"""Compatibility of a set of adapters, from their headers: one base, one family, one naming, same shapes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..adapter import Adapter
from ..errors import LoraMergeError
from ..formats.registry import mix_refusal
from ..options import MissingPolicy


@dataclass(frozen=True)
class SharedModules:
    """The modules of the output: name -> which inputs hold it, in first-appearance order."""

    names: list[str]
    present: dict[str, tuple[int, ...]]
    partial: list[str]  # modules present in only some inputs
    base_model: str | None


def _norm_base(b: str | None) -> str | None:
    return b.rstrip("/").lower() if b else None


def check_compatible(adapters: Sequence[Adapter], missing: MissingPolicy = "union") -> SharedModules:
    """Same base model (when recorded), same shape per shared module; decide partial modules.

    Raises one :class:`LoraMergeError` naming the first offending modules.  Reads headers only.
    """
    if not adapters:
        raise LoraMergeError("no input adapters given")
    bases = {a.label: a.meta.base_model for a in adapters if a.meta.base_model}
    distinct = {_norm_base(b) for b in bases.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in bases.items())
        raise LoraMergeError(f"the inputs were trained on different base models ({listing}); merge adapters of one base")
    families = {a.label: a.meta.extra.get("base_family") for a in adapters if a.meta.extra.get("base_family")}
    if len({f for f in families.values() if f != "unknown"}) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in families.items())
        raise LoraMergeError(f"the inputs belong to different model families ({listing}); they cannot be merged")
    why = mix_refusal(adapters)
    if why:
        raise LoraMergeError(why)
    namings = {a.label: a.meta.extra.get("naming") for a in adapters if a.meta.extra.get("naming")}
    if len(set(namings.values())) > 1:
        listing = "; ".join(f"{k}: {v}" for k, v in namings.items())
        raise LoraMergeError(
            f"the inputs name their modules differently ({listing}) and would not line up; convert them to one "
            "format first (a linear merge of each input alone, each written with the same «output_format»)"
        )

    order: list[str] = []
    seen: dict[str, list[int]] = {}
    for i, a in enumerate(adapters):
        for n in a.module_names():
            if n not in seen:
                seen[n] = []
                order.append(n)
            seen[n].append(i)

    bad: list[str] = []
    for n in order:
        infos = [adapters[i].modules[n] for i in seen[n]]
        ref = infos[0]
        for i, inf in zip(seen[n][1:], infos[1:]):
            if (inf.d_out, inf.d_in, inf.kind) != (ref.d_out, ref.d_in, ref.kind) or inf.weight_shape != ref.weight_shape:
                bad.append(
                    f"{n} ({adapters[seen[n][0]].label}: {ref.weight_shape} {ref.kind}, "
                    f"{adapters[i].label}: {inf.weight_shape} {inf.kind})"
                )
                break
    if bad:
        raise LoraMergeError(
            f"{len(bad)} modules have different shapes across inputs: " + "; ".join(bad[:3])
            + (" …" if len(bad) > 3 else "") + "; the adapters are for different models"
        )

    n_in = len(adapters)
    partial = [n for n in order if len(seen[n]) < n_in]
    if partial and missing == "error":
        raise LoraMergeError(
            f"{len(partial)} modules are missing from some inputs (e.g. {partial[0]}, held by "
            f"{', '.join(adapters[i].label for i in seen[partial[0]])}); use «missing» union or intersection"
        )
    keep = [n for n in order if missing == "union" or len(seen[n]) == n_in]
    if not keep:
        raise LoraMergeError("the inputs share no module; nothing to merge (try «missing» union)")
    base = next(iter(bases.values()), None)
    return SharedModules(keep, {n: tuple(seen[n]) for n in keep}, partial, base)
