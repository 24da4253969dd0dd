"""CTF (U4): RELION formula and sign, CTF(0) = Q0, astigmatism angle direction."""

from __future__ import annotations

import math

import numpy as np

from kernels.ctf import ctf_2d, ctf_at, electron_wavelength
from kernels.fourier import Band


def _relion_direct(x, y, dU, dV, ang, kv, cs, q0, phase, bfac, scale):
    """Scalar RELION getCTF (ctf.h) with constants of CTF::initialise (ctf.cpp), written out."""
    volts = kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    K1 = math.pi / 2 * 2 * lam
    K2 = math.pi / 2 * cs * 1e7 * lam**3
    K3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    K4 = -bfac / 4.0
    K5 = math.radians(phase)
    avg, dev = -(dU + dV) * 0.5, -(dU - dV) * 0.5
    u2 = x * x + y * y
    deltaf = 0.0 if (x == 0 and y == 0) else avg + dev * math.cos(
        2 * (math.atan2(y, x) - math.radians(ang))
    )
    arg = K1 * deltaf * u2 + K2 * u2 * u2 - K5 - K3
    return scale * -math.sin(arg) * math.exp(K4 * u2)


PARAMS = [
    dict(dU=15000.0, dV=13500.0, ang=37.0, kv=300.0, cs=2.7, q0=0.1, phase=0.0, bfac=0.0,
         scale=1.0),
    dict(dU=8000.0, dV=9000.0, ang=-71.0, kv=200.0, cs=1.4, q0=0.07, phase=90.0, bfac=60.0,
         scale=0.8),
    dict(dU=30000.0, dV=30000.0, ang=0.0, kv=120.0, cs=0.01, q0=0.2, phase=12.0, bfac=-20.0,
         scale=1.0),
]


def test_ctf_matches_relion_formula_1e4_points() -> None:
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 1 / 3.0, 10_000)  # up to 3 Å
    th = rng.uniform(-np.pi, np.pi, 10_000)
    sx, sy = s * np.cos(th), s * np.sin(th)
    got = ctf_at(
        sx, sy,
        np.array([p["dU"] for p in PARAMS]),
        np.array([p["dV"] for p in PARAMS]),
        np.array([p["ang"] for p in PARAMS]),
        voltage_kv=np.array([p["kv"] for p in PARAMS]),
        cs_mm=np.array([p["cs"] for p in PARAMS]),
        amplitude_contrast=np.array([p["q0"] for p in PARAMS]),
        phase_shift_deg=np.array([p["phase"] for p in PARAMS]),
        bfactor=np.array([p["bfac"] for p in PARAMS]),
        scale=np.array([p["scale"] for p in PARAMS]),
    )
    assert got.shape == (3, 10_000) and got.dtype == np.float32
    for b, p in enumerate(PARAMS):
        ref = np.array([_relion_direct(x, y, **p) for x, y in zip(sx, sy, strict=True)])
        assert np.abs(got[b] - ref).max() < 1e-6


def test_ctf_at_dc_is_q0_and_wavelength() -> None:
    for q0 in (0.0, 0.07, 0.1, 0.3):
        c = ctf_at(np.zeros(1), np.zeros(1), 20000.0, 18000.0, 10.0, voltage_kv=300.0,
                   cs_mm=2.7, amplitude_contrast=q0, dtype=np.float64)
        assert abs(c[0, 0] - q0) < 1e-12
    c2 = ctf_2d(32, 1.0, [12000.0], [12000.0], [0.0], voltage_kv=300, cs_mm=2.7,
                amplitude_contrast=0.1)
    assert abs(c2[0, 0, 0] - 0.1) < 1e-7
    assert abs(electron_wavelength(300.0) - 0.019687) < 1e-6  # 1.9687 pm at 300 kV


def test_astigmatism_angle_direction_on_grid() -> None:
    D, a = 64, 1.0
    common = dict(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, dtype=np.float64)
    dU, dV = 20000.0, 10000.0
    for ang in (0.0, 45.0, 90.0, 30.0):
        c = ctf_2d(D, a, dU, dV, ang, **common)[0]
        # grid pixel (kx, ky) = (10, 0), (7, 7), (0, 10) ...: row index ky (negative rows wrap)
        for kx, ky in [(10, 0), (7, 7), (0, 10), (7, -7), (9, 5)]:
            theta = math.degrees(math.atan2(ky, kx))
            s = math.hypot(kx, ky) / (D * a)
            df = 0.5 * (dU + dV) + 0.5 * (dU - dV) * math.cos(2 * math.radians(theta - ang))
            iso = ctf_at(np.array([s]), np.array([0.0]), df, df, 0.0, **common)[0, 0]
            assert abs(c[ky % D, kx] - iso) < 1e-12
    # along the angle the defocus is dU, perpendicular dV
    c = ctf_2d(D, a, dU, dV, 90.0, **common)[0]
    s = 10 / D
    on_u = ctf_at(np.array([s]), np.array([0.0]), dU, dU, 0.0, **common)[0, 0]
    on_v = ctf_at(np.array([s]), np.array([0.0]), dV, dV, 0.0, **common)[0, 0]
    assert abs(c[10, 0] - on_u) < 1e-12 and abs(c[0, 10] - on_v) < 1e-12
    assert abs(on_u - on_v) > 0.1


def test_ctf_2d_band_matches_full_grid() -> None:
    band = Band(48, 20)
    args = (48, 1.3, np.array([15000.0, 9000.0]), np.array([14000.0, 9500.0]),
            np.array([20.0, -40.0]))
    kw = dict(voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)
    full = ctf_2d(*args, **kw)
    assert full.shape == (2, 48, 25)
    np.testing.assert_array_equal(band.gather(full), ctf_2d(*args, **kw, band=band))
