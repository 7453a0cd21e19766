"""``--ray`` / ``--ray-address`` / ``--ray-workers``: the options of commands that can merge on Ray (issue 16)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

RayOpt = Annotated[bool, typer.Option("--ray", help="merge module batches as Ray tasks (local Ray, or --ray-address)")]
RayAddressOpt = Annotated[str | None, typer.Option(
    help="a running Ray cluster's address (default: $RAY_ADDRESS, else a local Ray per call); its merge "
         "workers stay warm for the next call (5 idle minutes)")]
RayWorkersOpt = Annotated[int | None, typer.Option(help="CPUs of a local Ray (default: all)")]


def ray_options(enabled: bool, address: str | None, workers: int | None) -> Any:
    """``RayOptions`` when ``--ray`` (or an address) is given, else None (the local driver)."""
    if not enabled and not address:
        return None
    from mergekit_lora.distributed.ray_merge import RayOptions

    return RayOptions(address=address, workers=workers)
