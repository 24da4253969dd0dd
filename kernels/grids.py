"""Pose and shift grids: HEALPix x psi grid on SO(3), in-plane angles, circular shift sets.

SO(3) grid of order N (algorithms.md §1.9, RELION healpix_sampling): HEALPix directions at
Nside = 2^N in the NESTED scheme (12 * 4^N pixel centres) times 6 * 2^N psi angles at the
cell centres psi_j = (j + 1/2) * step, step = 360 / (6 * 2^N) deg. A direction (theta, phi)
is the Euler pair (rot, tilt) = (phi, theta), i.e. the last row of the RELION matrix.
Grid index = direction * n_psi + psi index. Direction p at order N has the nested children
4p..4p+3 at order N+1, each combined with 2 psi angles (see ``so3_children``): 8 children.
HEALPix pixel centres are computed here from the standard nested
pix2ang relations (face number, bit-deinterleaved (ix, iy), ring index); healpy is not used.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from kernels.rotations import euler_to_matrix

# base-face ring offsets (in units of Nside) and longitude offsets (in units of pi/4)
_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4])
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7])


def _deinterleave(v: np.ndarray) -> np.ndarray:
    """Keep the even bits of v and compact them (bit 2i -> bit i)."""
    v = v & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    return (v | (v >> 16)) & 0x00000000FFFFFFFF


def healpix_nested_centres(nside: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (theta, phi) in radians of all 12*nside^2 HEALPix pixels, nested order."""
    if nside < 1 or nside & (nside - 1):
        raise ValueError(f"nside must be a power of 2, got {nside}")
    npix = 12 * nside * nside
    p = np.arange(npix, dtype=np.int64)
    face = p // (nside * nside)
    ipf = p % (nside * nside)
    ix = _deinterleave(ipf)
    iy = _deinterleave(ipf >> 1)
    jr = _JRLL[face] * nside - ix - iy - 1  # ring number, 1 .. 4*nside-1
    north = jr < nside
    south = jr > 3 * nside
    nr = np.where(north, jr, np.where(south, 4 * nside - jr, nside))
    z = np.where(
        north,
        1.0 - nr**2 / (3.0 * nside**2),
        np.where(south, -1.0 + nr**2 / (3.0 * nside**2), (2 * nside - jr) * 2.0 / (3.0 * nside)),
    )
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    jp = (_JPLL[face] * nr + ix - iy + 1 + kshift) // 2
    jp = np.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = np.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp - 0.5 * (kshift + 1)) * (0.5 * np.pi / nr)
    return np.arccos(np.clip(z, -1.0, 1.0)), phi


def so3_step_deg(order: int) -> float:
    """Angular step of the order-N grid: 360 / (6 * 2^N) degrees (30 deg at order 1)."""
    return 360.0 / (6 * 2**order)


def so3_sizes(order: int) -> tuple[int, int]:
    """(number of directions, number of psi angles) of the order-N grid."""
    return 12 * 4**order, 6 * 2**order


@functools.lru_cache(maxsize=8)
def _so3_angles(order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    n_dir, n_psi = so3_sizes(order)
    theta, phi = healpix_nested_centres(2**order)
    psi = (np.arange(n_psi) + 0.5) * so3_step_deg(order)
    rot = np.repeat(np.rad2deg(phi), n_psi)
    tilt = np.repeat(np.rad2deg(theta), n_psi)
    psi = np.tile(psi, n_dir)
    for a in (rot, tilt, psi):
        a.flags.writeable = False
    return rot, tilt, psi


def so3_grid_angles(order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rot, tilt, psi) in degrees of the order-N grid, each (M,), M = 12*4^N * 6*2^N."""
    return tuple(a.copy() for a in _so3_angles(order))


def so3_grid(order: int) -> np.ndarray:
    """RELION rotation matrices of the order-N HEALPix x psi grid -> (M, 3, 3) float64."""
    return euler_to_matrix(*_so3_angles(order))


def so3_children(order: int, indices: np.ndarray) -> np.ndarray:
    """Indices into ``so3_grid(order + 1)`` of the 8 children of grid points ``indices`` of
    ``so3_grid(order)`` -> (len(indices), 8): 4 sub-directions x 2 psi angles.

    Sub-directions are the nested HEALPix children 4p..4p+3. For each, the 2 psi angles are
    the fine-grid neighbours of the psi that brings that direction closest to the parent
    rotation (psi* = argmin_psi ||Rz(psi) Ry(tilt_c) Rz(rot_c) - A_parent||). Away from the
    poles these are the psi cells 2j, 2j+1 of the parent's psi cell j; near the poles, where
    rot and psi nearly add up, psi* compensates the children's change of rot, which keeps
    every child within the covering radius of the parent grid.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n_dir, n_psi = so3_sizes(order)
    if idx.size and (idx.min() < 0 or idx.max() >= n_dir * n_psi):
        raise IndexError(f"indices out of range for order {order}")
    parent = euler_to_matrix(*(a[idx] for a in _so3_angles(order)))  # (n, 3, 3)
    child_dir = 4 * (idx // n_psi)[:, None] + np.arange(4)[None, :]  # (n, 4)
    fine_n_psi = 2 * n_psi
    rot_f, tilt_f, _ = _so3_angles(order + 1)
    first = child_dir * fine_n_psi
    # B = Ry(tilt) Rz(rot) of each child direction; best psi maximises tr(Rz(psi) B A^T)
    B = euler_to_matrix(rot_f[first].ravel(), tilt_f[first].ravel(), 0.0)
    M = B.reshape(*first.shape, 3, 3) @ np.swapaxes(parent, -1, -2)[:, None]
    psi_best = np.rad2deg(np.arctan2(M[..., 1, 0] - M[..., 0, 1], M[..., 0, 0] + M[..., 1, 1]))
    lower = np.floor(psi_best / so3_step_deg(order + 1) - 0.5).astype(np.int64)
    child_psi = (lower[..., None] + np.arange(2)) % fine_n_psi  # (n, 4, 2)
    return (first[..., None] + child_psi).reshape(-1, 8)


def inplane_grid(step_deg: float) -> np.ndarray:
    """In-plane angles 0, s, 2s, ... < 360 deg with s = 360 / ceil(360 / step_deg) <= step_deg."""
    if step_deg <= 0:
        raise ValueError(f"step must be positive, got {step_deg}")
    n = max(1, math.ceil(360.0 / step_deg - 1e-9))
    return np.arange(n) * (360.0 / n)


def shift_grid(extent_px: float, step_px: float) -> np.ndarray:
    """Shifts (T, 2) as (tx, ty) in px on a square lattice of ``step_px`` within the disc of
    radius ``extent_px`` (inclusive), ordered by ty then tx; always contains (0, 0)."""
    if step_px <= 0:
        raise ValueError(f"step must be positive, got {step_px}")
    n = int(math.floor(extent_px / step_px + 1e-9))
    g = np.arange(-n, n + 1) * step_px
    ty, tx = np.meshgrid(g, g, indexing="ij")
    keep = tx**2 + ty**2 <= extent_px**2 * (1 + 1e-9) + 1e-12
    return np.stack([tx[keep], ty[keep]], axis=-1)
