"""Pose and shift grids (U12): sizes, spacing, children within the covering radius."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.grids import (
    healpix_nested_centres,
    inplane_grid,
    shift_grid,
    so3_children,
    so3_grid,
    so3_grid_angles,
    so3_sizes,
    so3_step_deg,
)
from kernels.rotations import matrix_to_quat, random_rotations


def _qdist(Q1: np.ndarray, Q2: np.ndarray) -> np.ndarray:
    """Pairwise geodesic distances (deg) between unit quaternion sets."""
    return np.degrees(2 * np.arccos(np.clip(np.abs(Q1 @ Q2.T), 0, 1)))


def _unit(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    st = np.sin(theta)
    return np.stack([st * np.cos(phi), st * np.sin(phi), np.cos(theta)], -1)


def test_healpix_centres() -> None:
    theta, phi = healpix_nested_centres(1)
    np.testing.assert_allclose(np.cos(theta), [2 / 3] * 4 + [0] * 4 + [-2 / 3] * 4, atol=1e-15)
    np.testing.assert_allclose(np.degrees(phi[:4]), [45, 135, 225, 315])
    np.testing.assert_allclose(np.degrees(phi[4:8]), [0, 90, 180, 270], atol=1e-12)
    for nside in (2, 4, 8):
        v = _unit(*healpix_nested_centres(nside))
        assert len(v) == 12 * nside**2
        assert np.abs(v.mean(0)).max() < 1e-12  # balanced on the sphere
        # nested: the nearest coarse centre of every fine pixel is its parent p // 4
        vc = _unit(*healpix_nested_centres(2 * nside))
        assert np.all(np.argmax(vc @ v.T, 1) == np.arange(len(vc)) // 4)
    with pytest.raises(ValueError):
        healpix_nested_centres(3)


@pytest.mark.parametrize("order, size", [(1, 576), (2, 4608)])
def test_u12_sizes_spacing_children(order: int, size: int) -> None:
    step = so3_step_deg(order)
    assert step == 60 / 2**order and so3_sizes(order) == (12 * 4**order, 6 * 2**order)
    G = so3_grid(order)
    assert G.shape == (size, 3, 3)
    rot, tilt, psi = so3_grid_angles(order)
    assert rot.shape == tilt.shape == psi.shape == (size,)
    Q = matrix_to_quat(G)
    D = _qdist(Q, Q)
    np.fill_diagonal(D, np.inf)
    nn = D.min(1)
    # measured: order 1 29.7-29.8 deg, order 2 13.1-15.0 deg (step 30 / 15)
    assert nn.min() > 0.8 * step and nn.max() < 1.05 * step
    # covering radius estimated from random rotations (measured 27.0 / 13.0 deg)
    Qr = matrix_to_quat(random_rotations(5000, np.random.default_rng(0)))
    cover = _qdist(Qr, Q).min(1).max()
    assert cover < step
    # children: 8 points of the next grid, all within the covering radius of their parent
    ch = so3_children(order, np.arange(size))
    assert ch.shape == (size, 8)
    Qf = matrix_to_quat(so3_grid(order + 1))
    dist = np.array([_qdist(Q[i : i + 1], Qf[ch[i]]).max() for i in range(size)])
    assert dist.max() < cover  # measured 18.8 / 10.1 deg
    assert np.all([len(set(c)) == 8 for c in ch])
    assert len(np.unique(ch)) == len(Qf)  # every fine point is someone's child


def test_children_subset_and_errors() -> None:
    ch = so3_children(1, [0, 575])
    assert ch.shape == (2, 8) and ch.max() < 4608
    # away from the poles the psi children are cells 2j, 2j+1 of the parent psi cell j
    n_dir, n_psi = so3_sizes(2)
    i = 100 * n_psi + 5  # an equatorial-ring direction
    fine_psi = so3_children(2, [i])[0] % (2 * n_psi)
    assert set(fine_psi) == {10, 11}
    with pytest.raises(IndexError):
        so3_children(1, [576])


def test_inplane_and_shift_grids() -> None:
    psi = inplane_grid(10.0)
    assert len(psi) == 36 and psi[0] == 0 and np.allclose(np.diff(psi), 10)
    psi = inplane_grid(7.0)
    assert len(psi) == 52 and np.diff(psi).max() <= 7.0
    t = shift_grid(6.0, 2.0)
    assert t.shape[1] == 2
    assert np.all(np.hypot(t[:, 0], t[:, 1]) <= 6.0 + 1e-9)
    assert len(t) == 29  # lattice points of step 2 in a disc of radius 6
    assert any((t == 0).all(1))
    assert len(shift_grid(0.0, 1.0)) == 1
    assert len(shift_grid(1.0, 1.0)) == 5
