"""LoRA-LEGO: rank-wise k-means clustering of rank units with dual reweighting (``lego``)."""

from .algorithm import Lego
from .params import LegoParams

__all__ = ["Lego", "LegoParams"]
