"""Guinier B-factor estimation and map sharpening (algorithms.md §6.2 final step; RELION
postprocess "auto-B").

Amplitude fall-off A(s) = rms |F| on the Fourier shell of s = r / (D a) (1/Å). A map blurred
by a Debye-Waller factor has A(s) ~ exp(-B s^2 / 4), so ln A against s^2 is a line of slope
-B/4 (``kernels.fourier.bfactor`` uses the same convention). The fit runs over the shells
between ``lo_res_A`` (10 Å by default) and the map's resolution; sharpening applies
exp(+B s^2 / 4) and low-passes at the resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.backend import to_host, xp_of
from kernels.fourier import bfactor, lowpass, radial_average, rfft3c, shells_3d


@dataclass(frozen=True)
class GuinierFit:
    """B (Å^2, amplitudes ~ exp(-B s^2 / 4); positive = blurred), ln-amplitude intercept and
    the shell range [r_lo, r_hi] of the fit."""

    bfactor: float
    intercept: float
    r_lo: int
    r_hi: int


def guinier_fit(vol: Any, pixel_size: float, hi_res_A: float, lo_res_A: float = 10.0,
                mask: Any = None) -> GuinierFit:
    """Least-squares line through (s^2, ln A(s)) of map vol (D, D, D) (times ``mask``) over
    shells r_lo = ceil(D a / lo_res_A) .. r_hi = floor(D a / hi_res_A) (r_hi < D/2).

    When that range holds fewer than 3 shells (boxes whose Nyquist is near 10 Å), r_lo moves
    down to r_hi - 2. Raises ValueError when r_hi < 3 or fewer than 3 shells have signal.
    """
    xp = xp_of(vol)
    D = vol.shape[-1]
    r_hi = min(int(math.floor(D * pixel_size / hi_res_A + 1e-9)), D // 2 - 1)
    if r_hi < 3:
        raise ValueError(f"resolution {hi_res_A:.3g} Å is below 3 Fourier shells of the box")
    r_lo = max(1, int(math.ceil(D * pixel_size / lo_res_A - 1e-9)))
    r_lo = min(r_lo, r_hi - 2)
    v = vol if mask is None else vol * xp.asarray(mask)
    F = rfft3c(xp.asarray(v, dtype=xp.float64))
    power = to_host(radial_average(xp.abs(F) ** 2, shells_3d(D, xp), D // 2))
    r = np.arange(r_lo, r_hi + 1)
    amp = np.sqrt(power[r])
    ok = amp > 0
    if ok.sum() < 3:
        raise ValueError("fewer than 3 shells with signal in the Guinier range")
    s2 = (r[ok] / (D * pixel_size)) ** 2
    slope, intercept = np.polyfit(s2, np.log(amp[ok]), 1)
    return GuinierFit(float(-4.0 * slope), float(intercept), int(r_lo), int(r_hi))


def sharpen(vol: Any, bfactor_A2: float, pixel_size: float, lowpass_res_A: float | None = None) -> Any:
    """Undo a Guinier fall-off: multiply by exp(+B s^2 / 4) (B = ``GuinierFit.bfactor``), then
    low-pass at ``lowpass_res_A`` (raised-cosine edge of 1 shell) if given. (D, D, D) float32."""
    xp = xp_of(vol)
    out = bfactor(xp.asarray(vol, dtype=xp.float32), -bfactor_A2, pixel_size, ndim=3)
    if lowpass_res_A is not None:
        D = vol.shape[-1]
        out = lowpass(out, D * pixel_size / lowpass_res_A, 1.0, ndim=3)
    return out.astype(xp.float32)
