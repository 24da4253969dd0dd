"""plots3d.map_views: densities in grey from their percentiles, difference maps on a scale
symmetric about 0 (a component and its negative are drawn as mirror images, 0 stays white)."""

from __future__ import annotations

import numpy as np

from jobs import plots3d


def test_signed_rows_keep_zero_and_sign() -> None:
    v = np.zeros((16, 16, 16), np.float32)
    v[4:7, 4:7, 4:7], v[9:12, 9:12, 9:12] = 2.0, -1.0
    fig = plots3d.map_views([v, v, -v], ["density", "component", "negated"], signed=[False, True, True])
    axes = fig.get_axes()
    grey, comp, neg = (np.asarray(axes[6 * i].images[0].get_array()) for i in range(3))  # projections along z
    assert axes[3].images[0].get_cmap().name == "gray" and axes[9].images[0].get_cmap().name == "RdBu_r"
    assert axes[9].images[0].get_clim() == (-1, 1)
    np.testing.assert_allclose(comp, -neg)
    assert comp[0, 0] == 0.0 and grey.min() >= 0.0  # empty voxel at the centre of the signed scale
    assert comp[5, 5] == 1.0 and comp[10, 10] < 0.0


def test_series_montage_shows_what_moves() -> None:
    """Two series of two frames: a blob that moves is red where it is and blue where it was; a
    series that does not change has an empty difference row."""
    a = np.zeros((16, 16, 16), np.float32)
    a[6:9, 3:6, 3:6] = 1.0
    b = np.roll(a, 8, axis=2)
    fig = plots3d.series_montage([a, b, a, a], 2, ["moves", "still"])
    axes = fig.get_axes()
    grid = [[np.asarray(axes[2 * row + c].images[0].get_array()) for c in range(2)] for row in range(4)]
    assert [axes[2 * row].get_ylabel() for row in range(4)] == ["moves", "moves - mean", "still", "still - mean"]
    np.testing.assert_array_equal(grid[0][1], np.roll(grid[0][0], 8, axis=1))  # one grey scale per series
    first, second = grid[1]
    assert first[4, 4] == 1.0 and first[4, 12] == -1.0 and second[4, 12] == 1.0
    assert np.abs(grid[3][0]).max() == 0.0 and grid[2][0].max() == 1.0
