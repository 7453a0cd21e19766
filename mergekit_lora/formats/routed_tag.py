"""How a routed adapter file is recognised, from its header metadata alone (no torch: sniffing runs for
every single-file source; :mod:`.routed` reads and writes the format)."""

from __future__ import annotations

FORMAT_TAG = "routed"
TAG_KEY = "mergekit_lora.format"


def sniff_routed(keys: list[str], metadata: dict[str, str]) -> bool:
    return (metadata or {}).get(TAG_KEY) == FORMAT_TAG
