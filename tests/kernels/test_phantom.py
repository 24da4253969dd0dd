"""Pseudo-atom phantom and analytic projector (algorithms.md §11.1, §1.4 conventions)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.ctf import ctf_2d
from kernels.fourier import freqs_2d, irfft2c, rfft2c
from kernels.phantom import (
    Atoms,
    apply_ctf,
    base_state,
    disk_signal_variance,
    hinge_angle_for,
    hinge_motion,
    make_phantom,
    noise_weighted_power,
    particle_atoms,
    project_atoms,
    project_difference,
    render_volume,
    state_moved,
    state_without,
)
from kernels.rotations import euler_to_matrix, random_rotations


def _rel_max(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_phantom_inside_radius_and_deterministic() -> None:
    D = 64
    ph = make_phantom(D, np.random.default_rng(3), n_atoms=200)
    again = make_phantom(D, np.random.default_rng(3), n_atoms=200)
    assert np.array_equal(ph.atoms.positions, again.atoms.positions)
    assert np.linalg.norm(ph.atoms.positions, axis=1).max() <= 0.35 * D + 1e-9
    assert (ph.atoms.sigmas >= 1.0).all() and (ph.atoms.sigmas <= 1.6).all()
    assert np.bincount(ph.domain).tolist() == [50, 50, 50, 50]


def test_identity_projection_equals_volume_z_sum() -> None:
    D = 64
    ph = make_phantom(D, np.random.default_rng(0), n_atoms=200)
    img = project_atoms(ph.atoms, np.eye(3)[None], np.zeros((1, 2)), D)[0]
    assert _rel_max(img, render_volume(ph.atoms, D).sum(axis=0)) < 1e-4


def test_rotated_projection_equals_rotated_volume_z_sum() -> None:
    D = 64
    rng = np.random.default_rng(1)
    ph = make_phantom(D, rng, n_atoms=200)
    R = random_rotations(5, rng)
    shifts = rng.uniform(-3, 3, (5, 2))
    imgs = project_atoms(ph.atoms, R, shifts, D)
    for i in range(5):
        pos = ph.atoms.positions @ R[i].T
        pos[:, :2] += shifts[i]
        vol = render_volume(Atoms(pos, ph.atoms.sigmas, ph.atoms.amplitudes), D)
        assert _rel_max(imgs[i], vol.sum(axis=0)) < 1e-4


def test_projection_is_the_fourier_slice_at_a_transpose_k() -> None:
    """The image's 2D FT at k equals the 3D FT of the unrotated volume at A^T (kx, ky, 0)
    (direct DFT at off-grid points; |k| < D/4 where aliasing of sigma >= 1.5 px is nil)."""
    D = 32
    ph = make_phantom(D, np.random.default_rng(2), n_atoms=60, sigma_px=(1.5, 2.0))
    vol = render_volume(ph.atoms, D).astype(np.float64)
    g = np.arange(D) - D // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    ky, kx = freqs_2d(D)
    sel = (kx**2 + ky**2) < (D / 4) ** 2
    k = np.stack([kx[sel], ky[sel], np.zeros(sel.sum())], axis=1).astype(float)
    A = euler_to_matrix(np.array([35.0]), np.array([70.0]), np.array([-120.0]))
    shift = np.array([[1.25, -0.5]])
    img = project_atoms(ph.atoms, A, shift, D)[0]
    F2 = rfft2c(img.astype(np.float64))[sel]
    F3 = np.exp(-2j * np.pi * (k @ A[0]) @ r.T / D) @ vol.ravel()  # k A = (A^T k)^T
    phase = np.exp(-2j * np.pi * (k[:, :2] @ shift[0]) / D)
    F3 *= phase
    assert np.linalg.norm(F2 - F3) / np.linalg.norm(F3) < 1e-4
    # the other convention (slice at A k) must not pass: the test can fail
    wrong = phase * (np.exp(-2j * np.pi * (k @ A[0].T) @ r.T / D) @ vol.ravel())
    assert np.linalg.norm(F2 - wrong) / np.linalg.norm(F3) > 0.1


def test_noise_weighted_power_is_parseval() -> None:
    """Oracle power of a band-limited image equals its real-space ||x||^2 / noise_var."""
    D = 32
    rng = np.random.default_rng(4)
    ky, kx = freqs_2d(D)
    F = rng.normal(size=(3, D, D // 2 + 1)) + 1j * rng.normal(size=(3, D, D // 2 + 1))
    r2 = kx**2 + ky**2
    F *= ((r2 > 0) & (r2 < (D / 2 - 1) ** 2))
    x = irfft2c(F, D)
    got = noise_weighted_power(x, None, 2.0)
    assert np.allclose(got, (x**2).sum(axis=(1, 2)) / 2.0, rtol=1e-6)
    ctf = ctf_2d(D, 3.0, np.full(3, 15000.0), np.full(3, 14500.0), np.full(3, 30.0),
                 voltage_kv=300, cs_mm=2.7, amplitude_contrast=0.1)
    y = apply_ctf(x.astype(np.float32), ctf)
    assert np.allclose(noise_weighted_power(x, ctf, 1.0), (y.astype(float) ** 2).sum(axis=(1, 2)),
                       rtol=1e-4)


def test_states_motion_and_difference_projection() -> None:
    D = 48
    rng = np.random.default_rng(5)
    ph = make_phantom(D, rng, n_atoms=120)
    states = [base_state(ph), state_without(ph, 1), state_moved(ph, 2, np.array([2.0, 0, 0]))]
    motion = hinge_motion(ph, 3, 20.0)
    n = 6
    R, sh = random_rotations(n, rng), np.zeros((n, 2))
    t = rng.uniform(-1, 1, n)
    a = particle_atoms(ph, states, np.zeros(n, int), t, motion)
    for b in (1, 2):
        other = particle_atoms(ph, states, np.full(n, b), t, motion)
        direct = project_atoms(a, R, sh, D) - project_atoms(other, R, sh, D)
        diff = project_difference(a, other, R, sh, D)
        assert np.abs(diff - direct).max() < 1e-4 * np.abs(direct).max()
    moving = a.positions[:, motion.mask]
    rest = a.positions[:, ~motion.mask]
    assert np.allclose(rest, ph.atoms.positions[~motion.mask])
    # rigid rotation about the hinge: distances to the pivot are preserved, angle = 20 deg * t
    d0 = ph.atoms.positions[motion.mask] - motion.pivot
    d1 = moving - motion.pivot
    assert np.allclose(np.linalg.norm(d1, axis=2), np.linalg.norm(d0, axis=1))
    perp0 = d0 - np.outer(d0 @ motion.axis, motion.axis)
    perp1 = d1[0] - np.outer(d1[0] @ motion.axis, motion.axis)
    cos = (perp0 * perp1).sum(1) / np.linalg.norm(perp0, axis=1) / np.linalg.norm(perp1, axis=1)
    assert np.allclose(np.degrees(np.arccos(np.clip(cos, -1, 1))), abs(20.0 * t[0]), atol=1e-6)


def test_hinge_angle_for_a_displacement() -> None:
    """The angle from hinge_angle_for moves the domain's atoms by the asked rms displacement (Å)
    between t = -1 and +1."""
    ph = make_phantom(48, np.random.default_rng(5), n_atoms=120)
    angle = hinge_angle_for(ph, 3, 12.0, 3.0)
    motion = hinge_motion(ph, 3, angle)
    ends = particle_atoms(ph, [base_state(ph)], np.zeros(2, int), np.array([-1.0, 1.0]), motion).positions
    d = np.linalg.norm(ends[1] - ends[0], axis=1)[motion.mask] * 3.0
    assert 0 < angle < 90
    assert np.isclose(np.sqrt((d**2).mean()), 12.0, rtol=1e-9)


@pytest.mark.parametrize("radius", [10.0, 14.0])
def test_disk_signal_variance(radius: float) -> None:
    D = 32
    img = np.zeros((1, D, D), np.float32)
    g = np.arange(D) - D // 2
    inside = (g[:, None] ** 2 + g[None, :] ** 2) <= radius**2
    img[0][inside] = np.where(np.arange(inside.sum()) % 2, 1.0, -1.0)
    img[0][~inside] = 100.0
    assert disk_signal_variance(img, radius)[0] == pytest.approx(1.0, rel=1e-3)
