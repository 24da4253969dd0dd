"""Noise spectrum (U3) and per-particle scale."""

from __future__ import annotations

import numpy as np

from kernels.fourier import Band, rfft2c
from kernels.noise import per_particle_scale, sigma2_per_shell


def test_u3_white_noise_sigma2() -> None:
    rng = np.random.default_rng(0)
    D, N, s = 32, 3000, 1.7
    band = Band(D, D // 2 - 1)
    x = (s * rng.standard_normal((N, D, D))).astype(np.float32)
    sig = sigma2_per_shell(band.gather(rfft2c(x)), band)
    expected = D**2 * s**2 / 2
    assert sig.shape == (band.n_shells,) and sig[0] == 0.0
    rel = sig[1:] / expected - 1
    assert abs(np.mean(rel)) < 0.01
    # per shell: within 5 standard errors (independent real components: weighted pixel count)
    n_eff = np.bincount(band.shell, weights=band.weight, minlength=band.n_shells)[1:] * N
    assert np.all(np.abs(rel) < 5 / np.sqrt(n_eff))
    assert np.abs(rel).max() < 0.03


def test_sigma2_coloured_and_r_min() -> None:
    rng = np.random.default_rng(1)
    band = Band(32, 12, r_min=3)
    amp = 1.0 + band.shell.astype(float)  # known per-shell std of |F|
    F = amp * (rng.standard_normal((4000, band.n)) + 1j * rng.standard_normal((4000, band.n)))
    sig = sigma2_per_shell(F, band)
    assert np.all(sig[:4] == 0)
    np.testing.assert_allclose(sig[4:], (1.0 + np.arange(4, 13)) ** 2, rtol=0.03)


def test_per_particle_scale() -> None:
    rng = np.random.default_rng(2)
    band = Band(32, 14)
    N = 50
    CP = rng.standard_normal((N, band.n)) + 1j * rng.standard_normal((N, band.n))
    alpha = rng.uniform(0.5, 2.0, N)
    inv_s2 = 1.0 / (1.0 + band.shell.astype(float))
    got = per_particle_scale(alpha[:, None] * CP, CP, inv_s2, weight=band.weight)
    np.testing.assert_allclose(got, alpha, rtol=1e-12)
    noise = 0.3 * (rng.standard_normal(CP.shape) + 1j * rng.standard_normal(CP.shape))
    got = per_particle_scale((alpha[:, None] * CP + noise).astype(np.complex64),
                             CP.astype(np.complex64), inv_s2)
    assert np.abs(got - alpha).max() < 0.05
    zero = per_particle_scale(CP[:2], np.zeros_like(CP[:2]), inv_s2)
    np.testing.assert_array_equal(zero, 1.0)
