"""FSC/FRC (U6), resolution at the first 0.143 crossing, phase-randomisation correction."""

from __future__ import annotations

import math

import numpy as np

from kernels.fourier import lowpass, shells_3d, soft_spherical_mask
from kernels.fsc import fsc, fsc_corrected_phase_randomised, randomize_phases, resolution_at


def _full_shell_counts(D: int) -> np.ndarray:
    """Voxels per shell on the full grid (half grid with the kx = 0 plane counted once)."""
    sh = shells_3d(D)
    hw = np.ones(sh.shape)
    hw[..., 0] = 0.5
    keep = sh < D // 2
    return 2 * np.bincount(sh[keep], hw[keep], D // 2)


def test_u6_identity_is_one():
    v = np.random.default_rng(0).standard_normal((32, 32, 32)).astype(np.float32)
    assert np.allclose(fsc(v, v), 1.0, atol=1e-6)


def test_u6_independent_noise_is_zero_mean_with_1_over_sqrt_n():
    rng = np.random.default_rng(1)
    D = 48
    z = fsc(rng.standard_normal((D,) * 3), rng.standard_normal((D,) * 3))[1:]
    z = z * np.sqrt(_full_shell_counts(D)[1:])
    assert np.abs(z).max() < 4.0
    assert abs(z.mean()) < 4.0 / np.sqrt(z.size)


def test_u6_known_ssnr():
    """Half maps S + N_i with white S (var 1) and noise var 1/SSNR: FSC = SSNR/(1+SSNR)."""
    rng = np.random.default_rng(2)
    D = 48
    for ssnr in (0.3, 1.0, 4.0):
        S = rng.standard_normal((D,) * 3)
        a = S + rng.standard_normal(S.shape) / np.sqrt(ssnr)
        b = S + rng.standard_normal(S.shape) / np.sqrt(ssnr)
        f = fsc(a, b)[2:]
        rho = ssnr / (1 + ssnr)
        sd = (1 - rho**2) / np.sqrt(_full_shell_counts(D)[2:])
        assert np.all(np.abs(f - rho) < 3.5 * sd), ssnr


def test_frc_batch_of_images():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 32, 32))
    f = fsc(a, a + 0.1 * rng.standard_normal(a.shape), ndim=2)
    assert f.shape == (3, 16)
    assert f[:, 1:].min() > 0.95


def test_resolution_first_crossing():
    r = np.arange(32)
    curve = 1.0 - r / 20.0  # crosses 0.143 at r = 17.14
    assert math.isclose(resolution_at(curve, 0.143, 64, 1.5), 64 * 1.5 / 17.14, rel_tol=1e-9)
    dip = np.ones(32)
    dip[10] = 0.1  # first crossing wins even if the curve recovers
    assert math.isclose(resolution_at(dip, 0.143, 64, 1.0), 64 / (9 + 0.857 / 0.9), rel_tol=1e-9)
    assert resolution_at(np.ones(32), 0.143, 64, 1.0) == 64 / 31
    assert resolution_at(np.r_[1.0, np.zeros(31)], 0.143, 64, 1.0) < math.inf


def test_randomize_phases_keeps_amplitudes_and_low_shells():
    rng = np.random.default_rng(4)
    D = 32
    v = rng.standard_normal((D,) * 3)
    w = randomize_phases(v, 6, rng)
    f = fsc(v, w)
    assert np.allclose(f[:7], 1.0, atol=1e-9)
    assert np.abs(f[10:]).max() < 0.3
    assert math.isclose(float((w**2).sum()), float((v**2).sum()), rel_tol=0.05)


def test_phase_randomised_correction_removes_mask_correlation():
    """Sharp-edged mask on a low-pass signal correlates the halves beyond the signal band;
    the corrected FSC there is consistent with zero."""
    rng = np.random.default_rng(5)
    D = 48
    S = lowpass(rng.standard_normal((D,) * 3), 6, edge_px=1) * 40.0
    a = S + rng.standard_normal(S.shape)
    b = S + rng.standard_normal(S.shape)
    mask = soft_spherical_mask(D, 12, 0)  # hard edge
    masked = fsc(a, b, mask)
    corrected = fsc_corrected_phase_randomised(a, b, mask, 10, rng)
    tail = slice(14, D // 2)
    sd = 1 / np.sqrt(_full_shell_counts(D)[tail] * (mask**2).mean())
    print("masked tail max", masked[tail].max(), "corrected tail max", np.abs(corrected[tail]).max())
    assert masked[tail].min() > 4 * sd.max()  # the artefact is there...
    assert np.all(np.abs(corrected[tail]) < 5 * sd)  # ...and the correction removes it
    assert np.allclose(corrected[:11], masked[:11])
