"""What a format's writer is handed: one typed :class:`WriteRequest` (torch-free).

The pipeline (``pipeline/output.py``) builds it for every output; a writer reads the fields it needs and its
own typed ``options`` — the object its :class:`~mergekit_lora.formats.registry.FormatSpec`'s ``write_options``
hook built from the run options (or one a caller such as ``export`` or calibrated routing built directly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapter import Adapter


@dataclass(frozen=True)
class WriteRequest:
    """One output to write into ``out_dir`` (an existing, empty temp folder of ``atomic.py``).

    ``modules``: ``(name, units)`` pairs in plan order, consumed once (``RankUnits``; numpy ``ArrayUnits`` for a
    torch-free merge into a format with ``FormatSpec.arrays``; ``RoutedUnits`` for the routed format); ``adapters``: the inputs (their metadata: base model, family, alpha); ``dtype``: the
    output dtype; ``method``: the merge method ("" for a conversion); ``target_modules`` / ``module_names``:
    the PEFT config's targets and every module the plan writes (a streaming writer sizes its header from
    them); ``recipe``: parameters, weights and seed for the format's metadata; ``options``: the format's own
    typed options (``FormatSpec.write_options``), None when it takes none.
    """

    out_dir: Path
    modules: Iterable[tuple[str, Any]]
    adapters: Sequence[Adapter]
    dtype: Any  # the output dtype: a torch dtype or its name ("bfloat16"; a torch-free merge names it)
    method: str = ""
    target_modules: list[str] | None = None
    module_names: Sequence[str] | None = None
    recipe: Mapping[str, Any] | None = None
    options: Any = None


# A format's writer: (request) -> the written config (a JSON-able summary).
Writer = Callable[[WriteRequest], dict[str, Any]]
