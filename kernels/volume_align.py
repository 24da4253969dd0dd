"""Superposition of a map onto a reference: rotation, translation and hand (host NumPy).

Used to compare maps that are only defined up to a rigid motion and the hand (ab-initio
output against the truth, classes against each other). ``align_volume`` searches the
rotation on a HEALPix grid by correlating Fourier amplitudes |F| (translation-invariant) at
low resolution, refines the best candidates on a local rotation-vector lattice by real-space
correlation after the best FFT translation, for the map and for its mirror image, and keeps
the best. Rotated maps: out(x) = vol(R^T x) about the box centre D//2 (trilinear).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kernels.align3d import local_lattice
from kernels.grids import so3_grid, so3_step_deg


@dataclass(frozen=True)
class Alignment:
    """The map moved onto the reference (D, D, D) float32, the rotation R (3, 3) and shift (3,)
    (x, y, z) px applied after it (to the mirrored map if ``mirrored``), real-space corr."""

    volume: np.ndarray
    R: np.ndarray
    shift: np.ndarray
    mirrored: bool
    corr: float


def mirror(vol: np.ndarray) -> np.ndarray:
    """The other hand: z -> -z about the box centre D//2."""
    return np.roll(vol[::-1], 1, axis=0)


def rotate_volume(vol: np.ndarray, R: np.ndarray, order: int = 1) -> np.ndarray:
    """out(x) = vol(R^T x), x (x, y, z) px from index D//2 (zero outside)."""
    D = vol.shape[-1]
    M = R.T[::-1, ::-1]  # R^T in (z, y, x) index order
    c = np.full(3, D // 2, dtype=np.float64)
    return ndimage.affine_transform(vol, M, offset=c - M @ c, order=order, mode="constant").astype(np.float32)


def _best_shift(vol: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float]:
    """Integer shift (x, y, z) that moves vol onto ref and the normalised correlation there."""
    a, b = vol - vol.mean(), ref - ref.mean()
    cc = np.fft.irfftn(np.fft.rfftn(b) * np.conj(np.fft.rfftn(a)), s=a.shape, axes=(0, 1, 2))
    z, y, x = np.unravel_index(int(cc.argmax()), cc.shape)
    D = a.shape[-1]
    s = np.array([x, y, z], dtype=np.float64)
    s = (s + D // 2) % D - D // 2
    return s, float(cc.max() / np.sqrt((a * a).sum() * (b * b).sum()))


def _amplitude_scores(vol: np.ndarray, ref: np.ndarray, rotations: np.ndarray, r_max: float) -> np.ndarray:
    """Correlation of |F_vol(R^T k)| with |F_ref(k)| over 1 <= |k| <= r_max per rotation."""
    D = vol.shape[-1]
    A = np.abs(np.fft.fftshift(np.fft.fftn(vol)))
    B = np.abs(np.fft.fftshift(np.fft.fftn(ref)))
    g = np.arange(D) - D // 2
    kz, ky, kx = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(kx**2 + ky**2 + kz**2)
    sel = (r >= 1) & (r <= r_max)
    k = np.stack([kx[sel], ky[sel], kz[sel]], axis=1).astype(np.float64)  # (P, 3)
    b = B[sel] - B[sel].mean()
    out = np.empty(len(rotations))
    for i, R in enumerate(rotations):
        q = k @ R  # rows R^T k
        a = ndimage.map_coordinates(A, [q[:, 2] + D // 2, q[:, 1] + D // 2, q[:, 0] + D // 2], order=1)
        a = a - a.mean()
        out[i] = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum() + 1e-300)
    return out


def align_volume(vol: np.ndarray, ref: np.ndarray, *, order: int = 2, r_max: float | None = None,
                 candidates: int = 4, try_mirror: bool = True) -> Alignment:
    """Best superposition of ``vol`` (or its mirror) onto ``ref`` (module doc). r_max: Fourier
    radius (px) of the amplitude search (default D/6)."""
    D = vol.shape[-1]
    r_max = D / 6 if r_max is None else r_max
    grid = so3_grid(order)
    step = so3_step_deg(order)
    dR, _ = local_lattice(step / 2, step / 4, 2.0)
    best: Alignment | None = None
    for mirrored in (False, True) if try_mirror else (False,):
        v = mirror(vol) if mirrored else vol
        scores = _amplitude_scores(v, ref, grid, r_max)
        for i in np.argsort(-scores)[:candidates]:
            for R in dR @ grid[i]:
                rot = rotate_volume(v, R)
                s, c = _best_shift(rot, ref)
                if best is None or c > best.corr:
                    best = Alignment(rot, R, s, mirrored, c)
    assert best is not None
    v = mirror(vol) if best.mirrored else vol
    rot = rotate_volume(v, best.R, order=3)
    moved = ndimage.shift(rot, best.shift[::-1], order=3, mode="constant").astype(np.float32)
    _, corr = _best_shift(moved, ref)
    return Alignment(moved, best.R, best.shift, best.mirrored, corr)
