"""User-facing errors: one clear sentence, no traceback, non-zero exit.

Core code names options by their field names (``MergeOptions.device``, a method parameter, a
``route()`` argument) and never by a command-line flag: a message marks an option as ``«device»``.
``str(error)`` shows the field name (what a Python caller or a recipe writes); the CLI renders the same
error with its own flag names (``--device``) through :meth:`LoraMergeError.render`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_OPTION = re.compile(r"«([A-Za-z_][A-Za-z0-9_]*)»")


def _field_name(name: str) -> str:
    return name


class LoraMergeError(Exception):
    """An error caused by the user's input (files, options, recipes).

    ``field`` names the option at fault when there is one.  The CLI prints ``error: <message>`` and
    exits with code 2; anything else is a bug and keeps its traceback.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.template = message
        self.field = field
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = _field_name) -> str:
        """The message with every ``«option»`` written as ``name(option)``."""
        return _OPTION.sub(lambda m: name(m.group(1)), self.template)


class PlanErrors(LoraMergeError):
    """Several problems found by one validation pass, reported together."""

    def __init__(self, problems: Sequence[LoraMergeError]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(p.template for p in self.problems))

    def render(self, name: Callable[[str], str] = _field_name) -> str:
        rows = [p.render(name) for p in self.problems]
        if len(rows) == 1:
            return rows[0]
        return f"{len(rows)} problems:\n" + "\n".join(f"  - {r}" for r in rows)


def raise_all(problems: Sequence[LoraMergeError]) -> None:
    """Raise nothing, the one problem, or all of them as :class:`PlanErrors`."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PlanErrors(problems)


def not_finite(where: str) -> str:
    """The one wording of a NaN/Inf number (weights, parameters, recipe values), wherever it is found."""
    return f"{where} is not a finite number; NaN and Inf cannot be merged, give a finite value"
