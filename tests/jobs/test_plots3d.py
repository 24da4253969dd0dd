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
