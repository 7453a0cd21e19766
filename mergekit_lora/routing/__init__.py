"""Rank routing: FlyLoRA / SMoRA-style routed composition of frozen LoRAs.

Importing this package registers the routed format with the readers (``load_adapter``), the
writers (``merge(..., method="route")``) and ``loramerge inspect``.
"""

from __future__ import annotations

from ..formats import FileReader, register_reader
from ..formats.writers import WRITERS
from ..inspect import INSPECTORS
from .format import (
    RoutedAdapter,
    RoutedUnits,
    inspect_routing,
    load_routed,
    read_routed_adapter,
    routed_writer,
    sniff_routed,
    write_routed,
)

register_reader(FileReader("routed", sniff_routed, read_routed_adapter), first=True)
WRITERS["routed"] = routed_writer
if inspect_routing not in INSPECTORS:
    INSPECTORS.append(inspect_routing)

from .api import RouteResult, route  # noqa: E402  (needs the registrations above)

__all__ = ["RoutedAdapter", "RoutedUnits", "RouteResult", "load_routed", "route", "write_routed"]
