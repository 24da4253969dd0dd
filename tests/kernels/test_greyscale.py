"""Greyscale of start maps (kernels/greyscale.py) on a simulated set whose images are the true
map's projections plus noise: the true map is on the data's scale, and the factor follows any
scaling of the map exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sim3d import Set3D, simulate

from kernels.align3d import SearchResult
from kernels.fourier import Band
from kernels.greyscale import match_greyscale
from kernels.projection import VolumeFT
from kernels.refine3d import expectation, plan_for

D, A, R_INIT = 24, 8.0, 6


@pytest.fixture(scope="module")
def data() -> tuple[Set3D, np.ndarray, np.ndarray, Band, np.ndarray]:
    s = simulate([300], D=D, pixel_size=A, snr=3.0, seed=2)
    band = Band(D, R_INIT)
    X, C = s.load(np.arange(300), band)
    return s, X, C, band, np.full(D // 2, D * D * s.noise_var / 2)


def _factor(data: tuple, vol: np.ndarray) -> float:
    s, X, C, band, sigma2 = data
    plan = plan_for(R_INIT, 2.0)

    def search(vft: VolumeFT) -> SearchResult:
        return expectation(X, C, sigma2, band, [vft], np.zeros(1), plan).result

    return match_greyscale(X, C, band, vol, None, sigma2, search, np.random.default_rng(0))[0]


def test_true_map_is_on_the_data_scale_and_scalings_are_undone(data) -> None:
    truth = data[0].maps[0]
    g = _factor(data, truth)
    print(f"greyscale of the true map {g:.3f}")
    assert 0.85 <= g <= 1.15
    for c in (0.01, 100.0):
        assert np.isclose(_factor(data, truth * np.float32(c)) * c, g, rtol=1e-4)

