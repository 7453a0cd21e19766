"""``trials.jsonl``: a header row with the search settings, then one row per finished trial.

Rows are appended and fsynced one at a time, so a killed search loses at most the trials in flight;
a torn last line (killed mid-write) is ignored on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mergekit_lora.errors import LoraMergeError


def read_trials(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(header settings, trial rows in file order); a torn final line is dropped."""
    if not path.is_file():
        return None, []
    lines = path.read_text(encoding="utf-8").splitlines()
    header, rows = None, []
    for i, line in enumerate(lines):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the write that was interrupted
            raise LoraMergeError(f"{path}:{i + 1}: not a JSON row; the file is damaged (use force to start over)") from None
        if "tune" in doc and header is None:
            header = doc["tune"]
        else:
            rows.append(doc)
    return header, rows


def append_row(path: Path, doc: dict[str, Any]) -> None:
    data = (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8")
    with path.open("ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rewrite(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Start the file over with ``rows`` (used after dropping a torn line on resume)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in [{"tune": header}, *rows]), encoding="utf-8")
    os.replace(tmp, path)
