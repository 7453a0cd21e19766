"""User-facing errors: one clear sentence, no traceback, non-zero exit."""

from __future__ import annotations


class LoraMergeError(Exception):
    """An error caused by the user's input (files, options, recipes).

    The CLI prints ``error: <message>`` and exits with code 2; anything else is a bug and keeps its
    traceback.
    """
