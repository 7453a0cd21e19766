"""Grid values of tuned `eval compare` rows: '1/n', '2/n', 'r', '2r', '4r' and plain numbers."""

from __future__ import annotations

import pytest

from mergekit_lora.errors import LoraMergeError
from mergekit_lora.evals.tune import grid_points, resolve_value


def test_resolve_values():
    assert resolve_value("1/n", n=4, r=8, key="weight") == 0.25
    assert resolve_value("2/n", n=4, r=8, key="weight") == 0.5
    assert resolve_value(1, n=4, r=8, key="weight") == 1
    assert resolve_value("r", n=4, r=8, key="k") == 8
    assert resolve_value("4r", n=4, r=8, key="k") == 32
    with pytest.raises(LoraMergeError, match="grid.k"):
        resolve_value("r/2", n=4, r=8, key="k")


def test_grid_points_order():
    pts = grid_points({"weight": ["1/n", 1], "density": [0.3, 0.5]}, n=2, r=8)
    assert pts == [{"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.5},
                   {"weight": 1, "density": 0.3}, {"weight": 1, "density": 0.5}]
