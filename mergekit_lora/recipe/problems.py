"""Recipe problems: ``path (line N): what to do``, collected and raised together."""

from __future__ import annotations

from ..errors import LoraMergeError
from .yaml_lines import Loc, format_loc, line_of

MAX_SHOWN = 50  # problems printed; the rest are counted


class Problems:
    """Collects ``path (line N): message`` problems; raised together as one :class:`LoraMergeError`.

    De-duplication is a set lookup (linear in the number of problems); at most :data:`MAX_SHOWN` rows
    are printed, then a count.
    """

    def __init__(self, name: str, lines: dict[Loc, int]) -> None:
        self.name = name
        self.lines = lines
        self.items: list[tuple[int, str, str]] = []
        self._seen: set[tuple[int, str, str]] = set()

    def add(self, loc: Loc, message: str) -> None:
        item = (line_of(self.lines, loc), format_loc(loc), message)
        if item not in self._seen:
            self._seen.add(item)
            self.items.append(item)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        ordered = sorted(self.items, key=lambda x: x[0])
        rows = [f"{path} (line {line}): {msg}" for line, path, msg in ordered[:MAX_SHOWN]]
        if len(ordered) == 1:
            raise LoraMergeError(f"{self.name}: {rows[0]}")
        more = len(ordered) - len(rows)
        tail = f"\n  … and {more} more (fix these first)" if more else ""
        raise LoraMergeError(f"{self.name}: {len(ordered)} problems in the recipe:\n"
                             + "\n".join(f"  - {r}" for r in rows) + tail)
