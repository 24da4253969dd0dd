"""Fourier conventions: Parseval, bands, resampling, shifts (U8), filters, masks."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.fourier import (
    Band,
    bfactor,
    find_shift,
    fourier_crop,
    fourier_pad,
    freqs_2d,
    freqs_3d,
    irfft2c,
    irfft3c,
    lowpass,
    radial_average,
    rfft2c,
    rfft3c,
    shells_2d,
    shells_3d,
    shift_images,
    shift_phase,
    soft_circular_mask,
    soft_spherical_mask,
)

D = 48


def _blobs(rng: np.random.Generator, D: int, n: int = 12, sigma: float = 2.0) -> np.ndarray:
    """Smooth test image: sum of Gaussian blobs within the central disc."""
    y, x = np.mgrid[:D, :D] - D // 2
    img = np.zeros((D, D))
    for cx, cy in rng.uniform(-D / 4, D / 4, (n, 2)):
        img += rng.uniform(0.5, 1.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return img


def _bandlimited(rng: np.random.Generator, D: int, r_max: int, shape=()) -> np.ndarray:
    band = Band(D, r_max)
    coef = rng.standard_normal((*shape, band.n)) + 1j * rng.standard_normal((*shape, band.n))
    return irfft2c(band.scatter(coef), D)


def test_roundtrip_and_layout() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, D, D)).astype(np.float32)
    F = rfft2c(x)
    assert F.shape == (3, D, D // 2 + 1) and F.dtype == np.complex64
    np.testing.assert_allclose(irfft2c(F, D), x, atol=1e-5)
    v = rng.standard_normal((D, D, D))
    np.testing.assert_allclose(irfft3c(rfft3c(v), D), v, atol=1e-10)
    # centre pixel at D//2 has a flat spectrum
    d = np.zeros((D, D))
    d[D // 2, D // 2] = 1
    np.testing.assert_allclose(rfft2c(d), 1.0, atol=1e-12)
    ky, kx = freqs_2d(D)
    assert ky.shape == kx.shape == (D, D // 2 + 1)
    np.testing.assert_array_equal(ky[:, 0], np.rint(np.fft.fftfreq(D) * D))
    kz, ky3, kx3 = freqs_3d(8)
    assert kz.shape == (8, 8, 5) and kz[5, 0, 0] == -3 and ky3[0, 2, 0] == 2 and kx3[0, 0, 4] == 4
    assert shells_2d(D)[3, 4] == 5 and shells_3d(8)[1, 1, 1] == 2


def test_parseval_2d_3d() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((D, D))
    F = rfft2c(x)
    c = np.full(F.shape[-1], 2.0)
    c[0] = c[-1] = 1.0  # kx = 0 and kx = D/2 columns have no mirror in the half plane
    lhs = np.sum(x**2)
    rhs = np.sum(c * np.abs(F) ** 2) / D**2
    assert abs(lhs - rhs) / lhs < 1e-12
    v = rng.standard_normal((16, 16, 16))
    G = rfft3c(v)
    c3 = np.full(G.shape[-1], 2.0)
    c3[0] = c3[-1] = 1.0
    assert abs(np.sum(v**2) - np.sum(c3 * np.abs(G) ** 2) / 16**3) / np.sum(v**2) < 1e-12


def test_band_weights_half_of_full_plane() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, D, D))
    band = Band(D, 17, r_min=2)
    half = np.sum(band.weight * np.abs(band.gather(rfft2c(x))) ** 2, axis=-1)
    Ffull = np.fft.fftn(np.fft.ifftshift(x, axes=(-2, -1)), axes=(-2, -1))
    f = np.fft.fftfreq(D) * D
    r = np.rint(np.hypot(f[:, None], f[None, :]))
    sel = (r > 2) & (r <= 17)
    full = np.sum(np.abs(Ffull[:, sel]) ** 2, axis=-1)
    np.testing.assert_allclose(half, 0.5 * full, rtol=1e-12)


def test_band_contents_and_scatter() -> None:
    band = Band(D, D // 2 - 1)
    assert np.all(band.shell > 0) and np.all(band.shell <= D // 2 - 1)
    assert np.all(np.abs(band.ky) < D // 2) and np.all(band.kx < D // 2)
    np.testing.assert_array_equal(band.shell, np.rint(np.hypot(band.kx, band.ky)))
    assert band.n_shells == D // 2
    v = np.arange(band.n, dtype=np.float64)[None] * np.ones((2, 1))
    back = band.gather(band.scatter(v))
    np.testing.assert_array_equal(back, v)
    assert np.count_nonzero(band.scatter(v + 1)) == 2 * band.n
    with pytest.raises(ValueError):
        Band(D, D / 2)


def test_crop_pad_roundtrip_bandlimited() -> None:
    rng = np.random.default_rng(3)
    x = _bandlimited(rng, D, 10, shape=(2,))
    small = fourier_crop(x, 32)
    assert small.shape == (2, 32, 32)
    back = fourier_pad(small, D)
    assert np.abs(back - x).max() < 1e-10 * np.abs(x).max() + 1e-12
    # constant image keeps its value (real-space amplitude)
    np.testing.assert_allclose(fourier_crop(np.full((D, D), 3.0), 24, ndim=2), 3.0, atol=1e-12)
    np.testing.assert_allclose(fourier_pad(np.full((D, D, D), 2.0), 64), 2.0, atol=1e-12)
    # volume round trip (band-limited along all axes)
    v = np.zeros((16, 16, 9), complex)
    kz, ky, kx = freqs_3d(16)
    sel = (kz**2 + ky**2 + kx**2 <= 9) & ((kx > 0) | (ky != 0) | (kz != 0))
    v[sel] = rng.standard_normal(sel.sum())
    vol = irfft3c(v, 16)
    np.testing.assert_allclose(fourier_crop(fourier_pad(vol, 24), 16), vol, atol=1e-12)


def test_shift_images_moves_delta_to_plus_t() -> None:
    x = np.zeros((2, D, D), np.float32)
    x[:, D // 2, D // 2] = 1
    t = np.array([[3, -2], [-5, 7]])
    y = shift_images(x, t)
    for i, (tx, ty) in enumerate(t):
        iy, ix = np.unravel_index(np.argmax(y[i]), (D, D))
        assert (ix - D // 2, iy - D // 2) == (tx, ty)
        assert abs(y[i, iy, ix] - 1) < 1e-5


def test_shift_phase_band_and_inverse() -> None:
    band = Band(D, 20)
    t = np.array([[1.3, -0.7], [0.0, 2.5]])
    full = shift_phase(D, t, dtype=np.complex128)
    np.testing.assert_allclose(band.gather(full), shift_phase(D, t, band, dtype=np.complex128))
    ky, kx = freqs_2d(D)
    np.testing.assert_allclose(full[0], np.exp(-2j * np.pi * (kx * 1.3 - ky * 0.7) / D))
    rng = np.random.default_rng(4)
    x = _bandlimited(rng, D, 18, shape=(2,))
    np.testing.assert_allclose(shift_images(shift_images(x, t), -t), x, atol=1e-10)


def test_find_shift_u8() -> None:
    rng = np.random.default_rng(5)
    ref = lowpass(_blobs(rng, 64), 20, 4)
    img = shift_images(ref[None], np.array([[2.5, -1.25]]))[0]
    t = find_shift(ref, img)
    assert np.abs(t - [2.5, -1.25]).max() < 0.05
    noisy = img + 0.05 * ref.std() * rng.standard_normal(img.shape)
    tn = find_shift(ref, noisy)
    assert np.abs(tn - [2.5, -1.25]).max() < 0.05
    # batched
    ts = np.array([[2.5, -1.25], [-4.3, 0.6], [0.0, 0.0]])
    imgs = shift_images(np.repeat(ref[None], 3, 0), ts)
    assert np.abs(find_shift(ref, imgs) - ts).max() < 0.05


def test_lowpass_and_bfactor() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((D, D))
    y = lowpass(x, 10, edge_px=3)
    r = np.hypot(*freqs_2d(D))
    F, G = rfft2c(x), rfft2c(y)
    assert np.abs(G[r > 13]).max() < 1e-9 * np.abs(F).max()
    np.testing.assert_allclose(G[r <= 10], F[r <= 10], atol=1e-9)
    v = rng.standard_normal((16, 16, 16))
    np.testing.assert_allclose(bfactor(v, 0.0, 1.2), v, atol=1e-12)
    np.testing.assert_allclose(bfactor(bfactor(v, 50.0, 1.2), -50.0, 1.2), v, atol=1e-9)
    b = bfactor(x, 100.0, 2.0)
    s2 = (r / (D * 2.0)) ** 2
    np.testing.assert_allclose(rfft2c(b), F * np.exp(-100.0 * s2 / 4), atol=1e-9)


def test_soft_masks() -> None:
    m = soft_circular_mask(D, 15, 6)
    assert m.dtype == np.float32 and m.shape == (D, D)
    assert m.min() >= 0 and m.max() <= 1
    assert m[D // 2, D // 2] == 1 and m[0, 0] == 0
    assert abs(m[D // 2, D // 2 + 18] - 0.5) < 1e-6  # radius + edge/2
    prof = m[D // 2, D // 2 :]
    assert np.all(np.diff(prof) <= 0)
    s = soft_spherical_mask(24, 8, 3)
    assert s.shape == (24, 24, 24) and s.min() >= 0 and s.max() <= 1
    assert s[12, 12, 12] == 1 and s[12, 12, 12 + 8] == 1 and s[12, 12, 12 + 11] == 0


def test_radial_average() -> None:
    shells = shells_2d(D)
    vals = np.stack([shells * 2.0, shells + 1.0j])
    out = radial_average(vals, shells, D // 2)
    assert out.shape == (2, D // 2)
    np.testing.assert_allclose(out[0], 2.0 * np.arange(D // 2))
    np.testing.assert_allclose(out[1], np.arange(D // 2) + 1j)
    s3 = shells_3d(16)
    np.testing.assert_allclose(radial_average(s3.astype(float), s3, 8), np.arange(8))
