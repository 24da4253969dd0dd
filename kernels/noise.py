"""Noise spectrum per shell and per-particle amplitude scale (algorithms.md §1.6, §1.13).

sigma2(r) is the variance PER REAL COMPONENT of a Fourier coefficient in shell r:
sigma2 = E|N(k)|^2 / 2. With the unnormalised forward FFT of ``kernels.fourier``, white
real-space noise of pixel variance s^2 gives sigma2 = D^2 s^2 / 2.
"""

from __future__ import annotations

from typing import Any

from kernels.backend import xp_of
from kernels.fourier import Band


def sigma2_per_shell(F_band: Any, band: Band) -> Any:
    """Per-shell noise variance per real component from band coefficients (N, nF) -> (n_shells,).

    sigma2(r) = sum_i sum_{k in r} w_k |F_i(k)|^2 / (2 N sum_{k in r} w_k), with the band's
    Hermitian weights w (0.5 on kx = 0). Shells without band pixels (DC, r <= r_min) are 0.
    float64.
    """
    xp = xp_of(F_band)
    F = F_band.reshape(-1, band.n)
    w = band.on(xp, "weight")
    shell = band.on(xp, "shell")
    power = xp.sum(xp.abs(F.astype(xp.complex128)) ** 2, axis=0)  # (nF,)
    num = xp.bincount(shell, weights=w * power, minlength=band.n_shells)
    den = xp.bincount(shell, weights=w, minlength=band.n_shells) * (2.0 * F.shape[0])
    return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)


def per_particle_scale(X: Any, CP: Any, inv_sigma2: Any, weight: Any | None = None) -> Any:
    """Noise-weighted least-squares amplitude alpha_i = Re<X_i, CP_i> / <CP_i, CP_i> -> (N,).

    X, CP: (N, nF) band coefficients of the images and of the CTF-modulated projections;
    inv_sigma2: (nF,) or (N, nF) 1/sigma2; weight: optional (nF,) Hermitian band weights.
    Sums run over the band as given (restrict the band to choose the resolution range).
    Particles with <CP, CP> = 0 get alpha = 1. float64.
    """
    xp = xp_of(X, CP, inv_sigma2)
    w = xp.asarray(inv_sigma2, dtype=xp.float64)
    if weight is not None:
        w = w * xp.asarray(weight, dtype=xp.float64)
    X = X.astype(xp.complex128)
    CP = CP.astype(xp.complex128)
    num = xp.sum(w * (X * xp.conj(CP)).real, axis=-1)
    den = xp.sum(w * (CP.real**2 + CP.imag**2), axis=-1)
    return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 1.0)
