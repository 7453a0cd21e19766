"""The strength policy: how strong a merged update is, one explicit choice shared by every method.

Weights are the task-arithmetic coefficients wᵢ of Σ wᵢ ΔWᵢ in every command (default 1/n each: the
exact average).  A method's raw output for those weights can be much weaker or stronger than that
average (TIES' disjoint mean of 1/n-weighted tensors keeps ~0.2 of its energy; LoRA-LEGO's dual
reweighting ~1.7×; Iso-C flattens the spectrum), so ``scale`` says what the output's strength is:

- ``none``: the method's output as computed;
- a positive number α: α × the method's output (the global α of the 2025 merging papers);
- ``average``: each module rescaled so that ‖ΔW‖_F equals the Frobenius norm of the exact weighted
  average Σ ŵᵢ ΔWᵢ (ŵ = w / Σ|w|; with the default weights, the plain average);
- ``sum``: n × that norm (the norm of the plain sum Σ ΔWᵢ at the default weights);
- ``F*average`` / ``F*sum``: F times the reference (what ``tune --search scale`` searches);
- ``auto``: the method's own default, chosen by measurement (``loramerge methods`` lists it).

A routed adapter keeps every unit, so its strength is applied to the weights (×c per input) rather than
by matching one ΔW's norm.  Importing this module imports no torch.

>>> parse_scale("1.5*average")
Scale(reference='average', factor=1.5)
>>> str(parse_scale(0.3))
'0.3'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Reference = Literal["none", "average", "sum"]
SCALE_HELP = ("strength of the merged update: auto (the method's default), none, average, sum, a number α, "
              "or F*average / F*sum")
_FORM = re.compile(r"^\s*(?:(?P<f>[0-9.eE+-]+)\s*\*\s*)?(?P<ref>average|sum)\s*$")


@dataclass(frozen=True)
class Scale:
    """A resolved strength: ``factor`` × the ``reference`` (``none``: × the method's own output)."""

    reference: Reference = "none"
    factor: float = 1.0

    def __str__(self) -> str:
        if self.reference == "none":
            return "none" if self.factor == 1.0 else _num(self.factor)
        return self.reference if self.factor == 1.0 else f"{_num(self.factor)}*{self.reference}"

    @property
    def is_identity(self) -> bool:
        return self.reference == "none" and self.factor == 1.0

    def describe(self) -> str:
        """One sentence for the merge summary and the model card."""
        if self.is_identity:
            return "none (the method's own output)"
        if self.reference == "none":
            return f"{self} (× the method's output)"
        what = "the exact weighted average Σ ŵᵢ ΔWᵢ" if self.reference == "average" else "n × the exact weighted average"
        times = "" if self.factor == 1.0 else f"{_num(self.factor)} × "
        return f"{self}: each module rescaled to {times}the Frobenius norm of {what}"

    def norm_factor(self, merged_norm: float, average_norm: float, n_inputs: int) -> float:
        """The multiplier c of one module's merged ΔW (norms in factor space; 1 when the output is zero)."""
        if self.reference == "none":
            return self.factor
        if merged_norm <= 0 or not math.isfinite(merged_norm):
            return 1.0
        ref = average_norm * (n_inputs if self.reference == "sum" else 1)
        return self.factor * ref / merged_norm

    def weight_factor(self, weights: list[float]) -> float:
        """The multiplier of every weight when the output is not one ΔW (routing): ``average`` makes the
        weights sum to 1 in absolute value, ``sum`` to n."""
        if self.reference == "none":
            return self.factor
        total = sum(abs(w) for w in weights)
        if total <= 0:
            return 1.0
        return self.factor * (len(weights) if self.reference == "sum" else 1) / total


def _num(x: float) -> str:
    return f"{x:g}"


def parse_scale(value: object) -> Scale:
    """A :class:`Scale` from ``none``, ``average``, ``sum``, a positive number or ``F*average`` / ``F*sum``.

    ``auto`` is resolved by the caller (the method's default); raises ValueError otherwise.
    """
    if isinstance(value, Scale):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Scale("none", _factor(float(value), value))
    if isinstance(value, str):
        s = value.strip()
        if s == "none":
            return Scale()
        m = _FORM.match(s)
        if m:
            return Scale(m.group("ref"), _factor(_float(m.group("f") or "1", value), value))  # type: ignore[arg-type]
        try:
            f = float(s)
        except ValueError:
            f = None
        if f is not None:
            return Scale("none", _factor(f, value))
    raise ValueError(f"expected auto, none, average, sum, a positive number or F*average / F*sum (got {value!r})")


def _float(s: str, value: object) -> float:
    try:
        return float(s)
    except ValueError:
        raise ValueError(f"expected a number before '*' (got {value!r})") from None


def _factor(f: float, value: object) -> float:
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"the strength factor must be a finite number > 0 (got {value!r})")
    return f


def normalize_scale(value: object) -> str:
    """The canonical spelling of a scale option value (``auto`` kept), for :class:`MergeOptions`."""
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    return str(parse_scale(value))
