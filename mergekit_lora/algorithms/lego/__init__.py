"""LoRA-LEGO: rank-wise k-means clustering of rank units with dual reweighting (``lego``).

The class is :class:`.algorithm.Lego` (imported by the registry when a merge needs it; importing this
package imports no torch)."""

from .params import LegoParams

__all__ = ["LegoParams"]
