"""Recipe problems: ``path (line N): what to do``, collected and raised together."""

from __future__ import annotations

from ..errors import LoraMergeError
from .yaml_lines import Loc, format_loc, line_of


class Problems:
    """Collects ``path (line N): message`` problems; raised together as one :class:`LoraMergeError`."""

    def __init__(self, name: str, lines: dict[Loc, int]) -> None:
        self.name = name
        self.lines = lines
        self.items: list[tuple[int, str, str]] = []

    def add(self, loc: Loc, message: str) -> None:
        item = (line_of(self.lines, loc), format_loc(loc), message)
        if item not in self.items:
            self.items.append(item)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        rows = [f"{path} (line {line}): {msg}" for line, path, msg in sorted(self.items, key=lambda x: x[0])]
        if len(rows) == 1:
            raise LoraMergeError(f"{self.name}: {rows[0]}")
        raise LoraMergeError(f"{self.name}: {len(rows)} problems in the recipe:\n" + "\n".join(f"  - {r}" for r in rows))
