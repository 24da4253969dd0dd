"""Gaussian-blob phantoms with exact Fourier transforms, shared by the K2 kernel tests."""

from __future__ import annotations

import numpy as np


def blob_centres(n: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """n points (x, y, z) in px, uniform in a ball of ``radius`` about the box centre."""
    c = rng.uniform(-1.0, 1.0, (8 * n, 3))
    return c[np.linalg.norm(c, axis=1) < 1.0][:n] * radius


def blob_volume(D: int, centres: np.ndarray, sigma: float, amps: np.ndarray) -> np.ndarray:
    """Voxelised sum of Gaussians amp * exp(-|x - c|^2 / (2 sigma^2)), (D, D, D) float32."""
    g = np.arange(D) - D // 2
    vol = np.zeros((D, D, D))
    for a, (cx, cy, cz) in zip(amps, centres, strict=True):
        ex = np.exp(-((g - cx) ** 2) / (2 * sigma**2))
        ey = np.exp(-((g - cy) ** 2) / (2 * sigma**2))
        ez = np.exp(-((g - cz) ** 2) / (2 * sigma**2))
        vol += a * ez[:, None, None] * ey[None, :, None] * ex[None, None, :]
    return vol.astype(np.float32)


def blob_slice_ft(D: int, centres: np.ndarray, sigma: float, amps: np.ndarray, R: np.ndarray, kx, ky) -> np.ndarray:
    """Exact FT of the projections at rotations R (N, 3, 3) at pixels (kx, ky): (N, nF) complex.

    Continuous FT of the blobs sampled at A^T (kx, ky, 0) (unnormalised, unit voxels).
    """
    k = np.stack([kx, ky, np.zeros_like(kx)], axis=-1).astype(np.float64)
    q = np.einsum("nij,fi->nfj", R, k)
    env = (2 * np.pi * sigma**2) ** 1.5 * np.exp(-2 * np.pi**2 * sigma**2 * (k**2).sum(-1) / D**2)
    out = np.zeros(q.shape[:2], dtype=np.complex128)
    for a, c in zip(amps, centres, strict=True):
        out += a * np.exp(-2j * np.pi * (q @ c) / D)
    return out * env[None, :]
