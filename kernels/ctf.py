"""Contrast transfer function, RELION formula and sign (CTF(0) = +Q0).

Verified against RELION source (3dem/relion, src/ctf.h CTF::getCTF/getDeltaF and
src/ctf.cpp CTF::initialise; read via the code search index, not copied):

    lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))            V in volts, lambda in Å
    K1 = pi*lambda ; K2 = (pi/2) Cs lambda^3 (Cs in Å = mm*1e7)
    K3 = atan(Q0 / sqrt(1 - Q0^2)) ; K4 = -B/4 ; K5 = phase shift (deg -> rad)
    deltaf(X, Y) = -(dU+dV)/2 - (dU-dV)/2 * cos(2*(atan2(Y, X) - angle))
    argument = K1 deltaf u^2 + K2 u^4 - K5 - K3 ;  CTF = scale * (-sin(argument)) * exp(K4 u^2)

i.e. CTF = sin(chi0 + K3) with chi0 = pi lambda df u^2 - (pi/2) Cs lambda^3 u^4 + phase and
df = (dU+dV)/2 + (dU-dV)/2 cos(2(theta - angle)), defocus positive = underfocus.
In CTF::getFftwImage X = jp/(xdim*angpix) is the column (x) frequency and Y = ip/(ydim*angpix)
the row (y) frequency, so the astigmatism angle is measured from the image x axis towards +y
(rows), the same grid as ``kernels.fourier.freqs_2d``: dU applies along that angle.
RELION's GPU path also floors |CTF| at 1e-8; that is not reproduced here.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import xp_of
from kernels.fourier import Band, freqs_2d


def electron_wavelength(voltage_kv: Any) -> Any:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    volts = voltage_kv * 1e3
    return 12.2643247 / (volts * (1.0 + 0.978466e-6 * volts)) ** 0.5


def ctf_at(
    sx: Any,
    sy: Any,
    defocus_u: Any,
    defocus_v: Any,
    defocus_angle: Any,
    *,
    voltage_kv: Any,
    cs_mm: Any,
    amplitude_contrast: Any,
    phase_shift_deg: Any = 0.0,
    bfactor: Any = 0.0,
    scale: Any = 1.0,
    dtype: Any = np.float32,
) -> Any:
    """CTF values at spatial frequencies (sx, sy) in 1/Å -> (B, *sx.shape).

    Parameters are scalars or (B,) arrays: defocus in Å (underfocus > 0), angle in degrees,
    voltage in kV, Cs in mm, amplitude contrast Q0 in [0, 1), phase shift in degrees,
    B-factor in Å^2, scale unitless. Evaluated in float64, returned as ``dtype``.
    """
    xp = xp_of(sx, sy, defocus_u, defocus_v, defocus_angle)
    sx = xp.asarray(sx, dtype=xp.float64)
    sy = xp.asarray(sy, dtype=xp.float64)
    extra = (1,) * sx.ndim

    def per_image(p: Any) -> Any:
        return xp.asarray(p, dtype=xp.float64).reshape((-1,) + extra)

    du, dv, ang = per_image(defocus_u), per_image(defocus_v), per_image(defocus_angle)
    q0 = per_image(amplitude_contrast)
    if bool(xp.any((q0 < 0) | (q0 >= 1))):
        raise ValueError("amplitude contrast must lie in [0, 1)")
    lam = electron_wavelength(per_image(voltage_kv))
    cs = per_image(cs_mm) * 1e7
    s2 = sx**2 + sy**2
    theta = xp.arctan2(sy, sx)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * xp.cos(2.0 * (theta - xp.deg2rad(ang)))
    chi = (
        np.pi * lam * df * s2
        - 0.5 * np.pi * cs * lam**3 * s2**2
        + xp.deg2rad(per_image(phase_shift_deg))
    )
    k3 = xp.arctan(q0 / xp.sqrt(1.0 - q0**2))
    ctf = xp.sin(chi + k3) * xp.exp(-per_image(bfactor) * s2 / 4.0) * per_image(scale)
    return ctf.astype(dtype)


def ctf_2d(
    D: int,
    pixel_size: float,
    defocus_u: Any,
    defocus_v: Any,
    defocus_angle: Any,
    *,
    voltage_kv: Any,
    cs_mm: Any,
    amplitude_contrast: Any,
    phase_shift_deg: Any = 0.0,
    bfactor: Any = 0.0,
    scale: Any = 1.0,
    band: Band | None = None,
    dtype: Any = np.float32,
    xp: ModuleType | None = None,
) -> Any:
    """CTF on the (D, D//2+1) half plane -> (B, D, D//2+1), or on a band -> (B, nF).

    pixel_size in Å/px; other parameters as in ``ctf_at``. ``xp`` defaults to the module
    of the defocus arrays.
    """
    xp = xp_of(defocus_u, defocus_v, defocus_angle) if xp is None else xp
    if band is None:
        ky, kx = freqs_2d(D, xp)
    else:
        ky, kx = band.on(xp, "ky"), band.on(xp, "kx")
    inv = 1.0 / (D * pixel_size)
    return ctf_at(
        kx * inv,
        ky * inv,
        xp.asarray(defocus_u),
        xp.asarray(defocus_v),
        xp.asarray(defocus_angle),
        voltage_kv=voltage_kv,
        cs_mm=cs_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift_deg=phase_shift_deg,
        bfactor=bfactor,
        scale=scale,
        dtype=dtype,
    )
