"""Starting (or joining) Ray: local Ray by default, a cluster with an address or ``RAY_ADDRESS``."""

from __future__ import annotations

import os
from typing import Any

from mergekit_lora.errors import LoraMergeError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LoraMergeError("Ray is not installed; install it with `pip install -e '.[ray]'` in the clone (or `make setup`)") from None
    return ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """The ``ray`` module, initialised: joins ``address`` (or ``$RAY_ADDRESS``), else starts local Ray
    with ``num_cpus`` CPUs.  An already initialised session (tests, notebooks) is reused as is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = int(num_cpus)
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise LoraMergeError(f"cannot reach the Ray cluster at {address!r} ({e}); check the address or "
                             "unset RAY_ADDRESS to use local Ray") from None
    return ray


def cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))
