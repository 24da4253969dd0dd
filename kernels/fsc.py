"""Fourier shell/ring correlation, resolution and phase-randomisation correction
(algorithms.md §1.10).

FSC(r) = Re sum_shell F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2) over shells r = round(|k|)
< D/2 of the half grid; the kx = 0 plane (column in 2D) is weighted 0.5 because it holds
every coefficient twice, so the sums equal half of the full-grid sums.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kernels.backend import to_host, xp_of
from kernels.fourier import (
    irfft2c,
    irfft3c,
    radial_average,
    rfft2c,
    rfft3c,
    shells_2d,
    shells_3d,
    spatial_ndim,
)


def _ft(x: Any, nd: int) -> Any:
    return rfft2c(x) if nd == 2 else rfft3c(x)


def _ift(F: Any, D: int, nd: int) -> Any:
    return irfft2c(F, D) if nd == 2 else irfft3c(F, D)


def _shells(D: int, nd: int, xp: Any) -> Any:
    return shells_2d(D, xp) if nd == 2 else shells_3d(D, xp)


def fsc_ft(F1: Any, F2: Any, shells: Any, n_shells: int) -> Any:
    """FSC of half-grid FTs F1, F2 (..., *grid) per shell (``shells`` of shape grid, the last
    axis being kx >= 0) -> (..., n_shells); empty shells or zero power give 0."""
    xp = xp_of(F1, F2)
    hw = xp.ones(shells.shape, dtype=xp.float64)
    hw[..., 0] = 0.5
    num = radial_average(hw * (F1 * xp.conj(F2)).real, shells, n_shells)
    d1 = radial_average(hw * xp.abs(F1) ** 2, shells, n_shells)
    d2 = radial_average(hw * xp.abs(F2) ** 2, shells, n_shells)
    den = xp.sqrt(d1 * d2)
    return xp.where(den > 0, num / xp.where(den > 0, den, 1.0), 0.0)


def fsc(a: Any, b: Any, mask: Any = None, ndim: int | None = None) -> Any:
    """FSC (3D volumes (D, D, D)) or FRC (images (..., D, D)) of real maps -> (..., D//2).

    ``mask`` multiplies both maps first. A (D, D, D) array is a volume unless ``ndim=2``.
    """
    xp = xp_of(a, b)
    nd = spatial_ndim(a, ndim)
    if mask is not None:
        m = xp.asarray(mask)
        a, b = a * m, b * m
    D = a.shape[-1]
    return fsc_ft(_ft(a, nd), _ft(b, nd), _shells(D, nd, xp), D // 2)


def resolution_at(curve: Any, threshold: float, D: int, pixel_size: float) -> float:
    """Resolution (Å) where ``curve`` first drops below ``threshold`` (searching from shell 1),
    with linear interpolation between the last shell above and the first below.

    Returns D*a/r_cross; inf if it crosses before shell 0 < r; the resolution of the last
    shell if it never crosses.
    """
    c = to_host(curve).astype(np.float64)
    below = np.flatnonzero(c[1:] < threshold)
    if below.size == 0:
        return D * pixel_size / (c.size - 1)
    r = int(below[0]) + 1
    hi, lo = c[r - 1], c[r]
    frac = (hi - threshold) / (hi - lo) if hi > threshold else 0.0
    r_cross = (r - 1) + float(np.clip(frac, 0.0, 1.0))
    return math.inf if r_cross <= 0 else D * pixel_size / r_cross


def randomize_phases(x: Any, from_shell: int, rng: np.random.Generator, ndim: int | None = None) -> Any:
    """Copy of real map(s) x with Fourier phases randomised in shells r > ``from_shell``
    (amplitudes kept; random phases are those of real white noise, so Hermitian-consistent)."""
    xp = xp_of(x)
    nd = spatial_ndim(x, ndim)
    D = x.shape[-1]
    F = _ft(x, nd)
    N = _ft(xp.asarray(rng.standard_normal(x.shape)), nd)
    unit = N / xp.maximum(xp.abs(N), 1e-30)
    Fr = xp.where(_shells(D, nd, xp) > from_shell, F * unit, F)
    return _ift(Fr, D, nd).astype(x.dtype, copy=False)


def fsc_corrected_phase_randomised(
    a: Any, b: Any, mask: Any, randomize_from_shell: int, rng: np.random.Generator
) -> Any:
    """Masked FSC corrected for mask-induced correlation (Chen et al. 2013).

    Beyond ``randomize_from_shell``: (FSC_mask - FSC_rand) / (1 - FSC_rand), FSC_rand being
    the masked FSC of the two maps with independently randomised phases there; below it the
    masked FSC unchanged.
    """
    xp = xp_of(a, b)
    f_mask = fsc(a, b, mask)
    ar = randomize_phases(a, randomize_from_shell, rng)
    br = randomize_phases(b, randomize_from_shell, rng)
    f_rand = fsc(ar, br, mask)
    r = xp.arange(f_mask.shape[-1])
    corrected = (f_mask - f_rand) / xp.maximum(1.0 - f_rand, 1e-6)
    return xp.where(r > randomize_from_shell, corrected, f_mask)
