"""Centred FFTs, frequency grids, band selections, resampling, filters and masks.

Conventions (DESIGN.md §3, algorithms.md §1.2): ``F = rfftn(ifftshift(x))`` unnormalised
forward, ``x = fftshift(irfftn(F))``; real-space centre at index D//2 (D even). Half-plane
layout (..., D, D//2+1): rows ky = fftfreq(D)*D, columns kx = 0..D/2; 3D (kz, ky, kx).
Shell index r(k) = round(|k|). With this normalisation white real-space noise of pixel
variance s^2 has E|N(k)|^2 = D^2 s^2 (D^3 s^2 in 3D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import xp_of

_AX2 = (-2, -1)
_AX3 = (-3, -2, -1)


def rfft2c(x: Any) -> Any:
    """Centred unnormalised 2D real FFT over the last two axes: (..., D, D) -> (..., D, D//2+1)."""
    xp = xp_of(x)
    return xp.fft.rfftn(xp.fft.ifftshift(x, axes=_AX2), axes=_AX2)


def irfft2c(F: Any, D: int) -> Any:
    """Inverse of ``rfft2c``: (..., D, D//2+1) -> (..., D, D) real."""
    xp = xp_of(F)
    return xp.fft.fftshift(xp.fft.irfftn(F, s=(D, D), axes=_AX2), axes=_AX2)


def rfft3c(v: Any) -> Any:
    """Centred unnormalised 3D real FFT over the last three axes: (D, D, D) -> (D, D, D//2+1)."""
    xp = xp_of(v)
    return xp.fft.rfftn(xp.fft.ifftshift(v, axes=_AX3), axes=_AX3)


def irfft3c(F: Any, D: int) -> Any:
    """Inverse of ``rfft3c``: (..., D, D, D//2+1) -> (..., D, D, D) real."""
    xp = xp_of(F)
    return xp.fft.fftshift(xp.fft.irfftn(F, s=(D, D, D), axes=_AX3), axes=_AX3)


def _int_fftfreq(D: int, xp: ModuleType) -> Any:
    return xp.asarray(np.rint(np.fft.fftfreq(D) * D).astype(np.int64))


def freqs_2d(D: int, xp: ModuleType = np) -> tuple[Any, Any]:
    """Integer frequency grids (ky, kx), each of shape (D, D//2+1)."""
    ky = _int_fftfreq(D, xp)[:, None]
    kx = xp.arange(D // 2 + 1, dtype=xp.int64)[None, :]
    shape = (D, D // 2 + 1)
    return xp.broadcast_to(ky, shape).copy(), xp.broadcast_to(kx, shape).copy()


def freqs_3d(D: int, xp: ModuleType = np) -> tuple[Any, Any, Any]:
    """Integer frequency grids (kz, ky, kx), each of shape (D, D, D//2+1)."""
    f = _int_fftfreq(D, xp)
    kx = xp.arange(D // 2 + 1, dtype=xp.int64)
    shape = (D, D, D // 2 + 1)
    return (
        xp.broadcast_to(f[:, None, None], shape).copy(),
        xp.broadcast_to(f[None, :, None], shape).copy(),
        xp.broadcast_to(kx[None, None, :], shape).copy(),
    )


def _radius_half(D: int, nd: int, xp: ModuleType) -> Any:
    """|k| (float64) on the 2D or 3D half grid."""
    ks = freqs_2d(D, xp) if nd == 2 else freqs_3d(D, xp)
    return xp.sqrt(sum(k.astype(xp.float64) ** 2 for k in ks))


def shells_2d(D: int, xp: ModuleType = np) -> Any:
    """Shell index round(|k|) on the (D, D//2+1) half plane (int64)."""
    return xp.rint(_radius_half(D, 2, xp)).astype(xp.int64)


def shells_3d(D: int, xp: ModuleType = np) -> Any:
    """Shell index round(|k|) on the (D, D, D//2+1) half volume (int64)."""
    return xp.rint(_radius_half(D, 3, xp)).astype(xp.int64)


@dataclass(eq=False)
class Band:
    """Half-plane pixels of a D-box with r_min < round(|k|) <= r_max (whole shells), DC excluded.

    ``r_max`` must be < D/2, so the Nyquist row/column and corners are never included.
    Index arrays are host NumPy arrays; ``gather``/``scatter`` work on NumPy or CuPy data.
    ``weight`` is 0.5 on the kx == 0 column (its pixels appear twice as k and -k) and 1
    elsewhere, so sum_band weight*|F|^2 = 0.5 * sum over the full plane of the same shells.
    """

    D: int
    r_max: float
    r_min: float = 0
    idx: np.ndarray = field(init=False, repr=False)
    kx: np.ndarray = field(init=False, repr=False)
    ky: np.ndarray = field(init=False, repr=False)
    shell: np.ndarray = field(init=False, repr=False)
    weight: np.ndarray = field(init=False, repr=False)
    _dev: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.D % 2:
            raise ValueError(f"box size must be even, got {self.D}")
        if not self.r_max < self.D / 2:
            raise ValueError(f"r_max must be < D/2 = {self.D / 2}, got {self.r_max}")
        ky, kx = freqs_2d(self.D)
        shells = shells_2d(self.D)
        sel = (shells > max(self.r_min, 0)) & (shells <= self.r_max)
        self.idx = np.flatnonzero(sel)
        self.kx = kx.ravel()[self.idx]
        self.ky = ky.ravel()[self.idx]
        self.shell = shells.ravel()[self.idx]
        self.weight = np.where(self.kx == 0, 0.5, 1.0)

    @property
    def n(self) -> int:
        """Number of band pixels nF."""
        return int(self.idx.size)

    @property
    def n_shells(self) -> int:
        """Length of per-shell arrays indexed by ``shell`` (= floor(r_max) + 1)."""
        return int(math.floor(self.r_max)) + 1

    def on(self, xp: ModuleType, name: str) -> Any:
        """Attribute ``name`` ("idx", "kx", "ky", "shell", "weight") as an ``xp`` array (cached)."""
        if xp is np:
            return getattr(self, name)
        key = (xp.__name__, name)
        if key not in self._dev:
            self._dev[key] = xp.asarray(getattr(self, name))
        return self._dev[key]

    def gather(self, F: Any) -> Any:
        """(..., D, D//2+1) -> (..., nF)."""
        xp = xp_of(F)
        flat = F.reshape(*F.shape[:-2], F.shape[-2] * F.shape[-1])
        return flat[..., self.on(xp, "idx")]

    def scatter(self, values: Any) -> Any:
        """(..., nF) -> (..., D, D//2+1), zeros outside the band."""
        xp = xp_of(values)
        lead = values.shape[:-1]
        out = xp.zeros((*lead, self.D * (self.D // 2 + 1)), dtype=values.dtype)
        out[..., self.on(xp, "idx")] = values
        return out.reshape(*lead, self.D, self.D // 2 + 1)


def spatial_ndim(x: Any, ndim: int | None) -> int:
    """2 for image stacks (..., D, D); 3 for a cubic (D, D, D) volume unless ndim says otherwise."""
    if ndim is not None:
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        return ndim
    return 3 if x.ndim == 3 and x.shape[0] == x.shape[1] == x.shape[2] else 2


def _resample(x: Any, D_new: int, nd: int) -> Any:
    xp = xp_of(x)
    axes = _AX2 if nd == 2 else _AX3
    D = x.shape[-1]
    if D % 2 or D_new % 2:
        raise ValueError(f"box sizes must be even, got {D} -> {D_new}")
    F = xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(x, axes=axes), axes=axes), axes=axes)
    lead = x.shape[: x.ndim - nd]
    if D_new <= D:
        s = slice(D // 2 - D_new // 2, D // 2 - D_new // 2 + D_new)
        G = F[(Ellipsis, *([s] * nd))]
    else:
        G = xp.zeros((*lead, *([D_new] * nd)), dtype=F.dtype)
        s = slice(D_new // 2 - D // 2, D_new // 2 - D // 2 + D)
        G[(Ellipsis, *([s] * nd))] = F
    y = xp.fft.fftshift(xp.fft.ifftn(xp.fft.ifftshift(G, axes=axes), axes=axes), axes=axes)
    return (y.real * (D_new / D) ** nd).astype(x.dtype, copy=False)


def fourier_crop(x: Any, D_new: int, ndim: int | None = None) -> Any:
    """Downsample real images (..., D, D) or a volume (D, D, D) to D_new by Fourier cropping.

    Keeps real-space amplitude (a constant image keeps its value). A (D, D, D) array is
    treated as a volume unless ``ndim=2`` is given (stacks of D images of size D).
    """
    if D_new > x.shape[-1]:
        raise ValueError("fourier_crop needs D_new <= D; use fourier_pad")
    return _resample(x, D_new, spatial_ndim(x, ndim))


def fourier_pad(x: Any, D_new: int, ndim: int | None = None) -> Any:
    """Upsample real images (..., D, D) or a volume (D, D, D) to D_new by Fourier zero-padding."""
    if D_new < x.shape[-1]:
        raise ValueError("fourier_pad needs D_new >= D; use fourier_crop")
    return _resample(x, D_new, spatial_ndim(x, ndim))


def shift_phase(
    D: int,
    shifts: Any,
    band: Band | None = None,
    *,
    dtype: Any = np.complex64,
    xp: ModuleType | None = None,
) -> Any:
    """Phase ramps exp(-2*pi*i*(kx*tx + ky*ty)/D) that move image content by +t.

    shifts: (T, 2) in pixels as (tx, ty). Returns (T, nF) for a band, else (T, D, D//2+1).
    Computed in float64 as the product of the per-axis ramps over the distinct kx and ky
    values (cos/sin on (T, ~D) instead of (T, nF)), cast to ``dtype``.
    """
    xp = xp_of(shifts) if xp is None else xp
    t = xp.asarray(shifts, dtype=xp.float64).reshape(-1, 2)
    if band is None:
        ky, kx = freqs_2d(D, xp)
    else:
        ky, kx = band.on(xp, "ky"), band.on(xp, "kx")
    out = None
    for k, tk in ((kx, t[:, 0]), (ky, t[:, 1])):
        values, index = xp.unique(k.ravel(), return_inverse=True)
        phase = (-2.0 * np.pi / D) * (tk[:, None] * values[None, :].astype(xp.float64))
        ramp = (xp.cos(phase) + 1j * xp.sin(phase))[:, index.ravel()]
        out = ramp if out is None else xp.multiply(out, ramp, out=out)
    return out.reshape(t.shape[0], *kx.shape).astype(dtype)


def shift_images(x: Any, shifts: Any) -> Any:
    """Shift real images (N, D, D) by shifts (N, 2) px (tx, ty): content moves by +t."""
    D = x.shape[-1]
    F = rfft2c(x)
    ramp = shift_phase(D, shifts, dtype=F.dtype, xp=xp_of(x))
    return irfft2c(F * ramp, D).astype(x.dtype, copy=False)


def find_shift(ref: Any, img: Any) -> Any:
    """Shift t (tx, ty) in px such that ``img`` ~ ``ref`` shifted by +t (see ``shift_images``).

    ref, img: (..., D, D) (broadcastable). Integer peak of the FFT cross-correlation, then
    Newton refinement of the Fourier-interpolated cross-correlation over |k| < D/2.
    Returns (..., 2) float64.
    """
    xp = xp_of(ref, img)
    D = img.shape[-1]
    P = rfft2c(img).astype(xp.complex128) * xp.conj(rfft2c(ref))
    cc = xp.fft.fftshift(xp.fft.irfftn(P, s=(D, D), axes=_AX2), axes=_AX2)
    lead = cc.shape[:-2]
    peak = xp.argmax(cc.reshape(*lead, D * D), axis=-1)
    t = xp.stack([peak % D - D // 2, peak // D - D // 2], axis=-1).astype(xp.float64)

    band = Band(D, D // 2 - 1)
    Pb = band.gather(P) * band.on(xp, "weight")
    k = xp.stack([band.on(xp, "kx"), band.on(xp, "ky")], axis=-1).astype(xp.float64)
    k *= 2.0 * np.pi / D  # (nF, 2)
    kk = k[:, :, None] * k[:, None, :]  # (nF, 2, 2)
    for _ in range(20):
        e = Pb * xp.exp(1j * (t @ k.T))  # cc(t) = Re sum P exp(+i k.t)
        grad = -(e.imag @ k)
        hess = -xp.einsum("...f,fij->...ij", e.real, kk)
        step = -xp.linalg.solve(hess, grad[..., None])[..., 0]
        step = xp.clip(step, -0.5, 0.5)
        t = t + step
        if float(xp.max(xp.abs(step))) < 1e-9:
            break
    return t


def _filter_half(x: Any, filt: Any, nd: int) -> Any:
    """Multiply the centred half-grid FT of real x by ``filt`` and transform back."""
    D = x.shape[-1]
    if nd == 2:
        return irfft2c(rfft2c(x) * filt, D).astype(x.dtype, copy=False)
    return irfft3c(rfft3c(x) * filt, D).astype(x.dtype, copy=False)


def _raised_cosine(r: Any, radius: float, edge: float, xp: ModuleType) -> Any:
    """1 for r <= radius, 0.5*(1+cos(pi*(r-radius)/edge)) up to radius+edge, 0 beyond."""
    if edge <= 0:
        return (r <= radius).astype(xp.float64)
    u = xp.clip((r - radius) / edge, 0.0, 1.0)
    return 0.5 * (1.0 + xp.cos(np.pi * u))


def lowpass(x: Any, res_px_radius: float, edge_px: float = 2, ndim: int | None = None) -> Any:
    """Low-pass real images (..., D, D) or a volume (D, D, D) at Fourier radius ``res_px_radius``
    (Fourier pixels of this box), raised-cosine edge of ``edge_px`` beyond it."""
    xp = xp_of(x)
    nd = spatial_ndim(x, ndim)
    filt = _raised_cosine(_radius_half(x.shape[-1], nd, xp), res_px_radius, edge_px, xp)
    return _filter_half(x, filt, nd)


def bfactor(x: Any, B: float, pixel_size: float, ndim: int | None = None) -> Any:
    """Apply exp(-B s^2 / 4) (s in 1/Å, B in Å^2; negative B sharpens) to images or a volume."""
    xp = xp_of(x)
    nd = spatial_ndim(x, ndim)
    D = x.shape[-1]
    s = _radius_half(D, nd, xp) / (D * pixel_size)
    return _filter_half(x, xp.exp(-B * s**2 / 4.0), nd)


def _real_radius(D: int, nd: int, xp: ModuleType) -> Any:
    c = xp.arange(D, dtype=xp.float64) - D // 2
    grids = xp.meshgrid(*([c] * nd), indexing="ij")
    return xp.sqrt(sum(g**2 for g in grids))


def soft_circular_mask(D: int, radius_px: float, edge_px: float, xp: ModuleType = np) -> Any:
    """(D, D) float32 mask: 1 within radius_px of the centre (D//2, D//2), raised-cosine edge."""
    return _raised_cosine(_real_radius(D, 2, xp), radius_px, edge_px, xp).astype(xp.float32)


def soft_spherical_mask(D: int, radius_px: float, edge_px: float, xp: ModuleType = np) -> Any:
    """(D, D, D) float32 mask: 1 within radius_px of the centre, raised-cosine edge."""
    return _raised_cosine(_real_radius(D, 3, xp), radius_px, edge_px, xp).astype(xp.float32)


def radial_average(values: Any, shells: Any, n_shells: int) -> Any:
    """Mean of ``values`` (..., *grid) per shell index (``shells``, shape grid) -> (..., n_shells).

    Pixels with shell >= n_shells are ignored; empty shells give 0. Accumulates in float64
    (complex128 for complex input).
    """
    xp = xp_of(values, shells)
    sh = xp.asarray(shells).ravel()
    lead = values.shape[: values.ndim - xp.asarray(shells).ndim]
    v = values.reshape(-1, sh.size)
    keep = sh < n_shells
    sh, v = sh[keep], v[:, keep]
    counts = xp.bincount(sh, minlength=n_shells).astype(xp.float64)
    nb = v.shape[0]
    flat_idx = (sh[None, :] + n_shells * xp.arange(nb)[:, None]).ravel()

    def _sum(part: Any) -> Any:
        s = xp.bincount(flat_idx, weights=part.astype(xp.float64).ravel(), minlength=nb * n_shells)
        return s.reshape(nb, n_shells)

    total = _sum(v.real) + 1j * _sum(v.imag) if xp.iscomplexobj(v) else _sum(v)
    mean = total / xp.maximum(counts, 1.0)
    return mean.reshape(*lead, n_shells)

