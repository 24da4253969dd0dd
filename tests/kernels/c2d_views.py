"""Synthetic 2D-classification sets (algorithms.md §3.5, §11): discrete views of a Gaussian-atom
phantom, uniform in-plane angles, Gaussian shifts, RELION CTF, white noise at a §11.2 SNR.

Shared by tests/kernels/test_classify2d.py and tests/jobs/test_class_2d.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.ctf import ctf_2d
from kernels.fourier import Band, rfft2c
from kernels.phantom import Atoms, apply_ctf, disk_signal_variance, make_phantom, project_atoms
from kernels.rotations import euler_to_matrix, matrix_to_euler, random_rotations

VOLTAGE, CS, Q0 = 300.0, 2.7, 0.1


@dataclass
class ViewSet:
    """Particles (N, D, D) float32 and their truth: view label, psi (deg), shift (N, 2) px (content
    moved by +t), CTF parameters, CTF-free view projections (V, D, D) at psi 0, noise variance."""

    images: np.ndarray
    view: np.ndarray
    psi: np.ndarray
    shift: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    views: np.ndarray
    view_angles: np.ndarray  # (V, 2) rot, tilt
    noise_var: float
    pixel_size: float
    max_view_corr: float
    atoms: Atoms
    signal_var: float  # mean signal variance in the particle disc (CTF applied)


def aligned_corr(a: np.ndarray, b_rot: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Max normalised cross-correlation of image a (D, D) with rotated copies b_rot (P, D, D)
    over all cyclic shifts -> (corr, best rotation index, shift (tx, ty) moving b onto a)."""
    D = a.shape[-1]
    a0 = a - a.mean()
    b0 = b_rot - b_rot.mean(axis=(1, 2), keepdims=True)
    cc = np.fft.irfft2(rfft2c(a0) * np.conj(rfft2c(b0)), s=(D, D))
    cc /= np.sqrt((a0**2).sum() * (b0**2).sum(axis=(1, 2)))[:, None, None]
    j, y, x = np.unravel_index(int(cc.argmax()), cc.shape)
    t = np.array([(x + D // 2) % D - D // 2, (y + D // 2) % D - D // 2], dtype=float)
    return float(cc.max()), int(j), t


def simulate(
    counts: list[int],
    *,
    D: int = 48,
    pixel_size: float = 4.0,
    snr: float = 0.1,
    seed: int = 0,
    max_corr: float = 0.68,
    shift_sd: float = 2.0,
    shift_max: float = 6.0,
    n_domains: int = 8,
    max_tries: int = 1000,
    twin_corr: float | None = None,
) -> ViewSet:
    """len(counts) views (pairwise in-plane-aligned correlation < max_corr) with counts[v]
    particles each, shuffled; defocus U[1, 2.5] um, astigmatism <= 500 Å. twin_corr: view 1
    is view 0 tilted by the smallest whole degree that brings their aligned correlation to
    <= twin_corr (a pair of similar views, §3.5 T5)."""
    rng = np.random.default_rng(seed)
    atoms = make_phantom(D, rng, n_domains=n_domains).atoms
    psi_probe = np.arange(0, 360, 5.0)
    chosen: list[tuple[float, float]] = []
    projs: list[np.ndarray] = []
    worst = 0.0
    for _ in range(max_tries):
        if len(chosen) == len(counts):
            break
        rot, tilt, _ = matrix_to_euler(random_rotations(1, rng))
        R = euler_to_matrix(np.full(psi_probe.size, rot[0]), tilt[0], psi_probe)
        cand = project_atoms(atoms, R, np.zeros((psi_probe.size, 2)), D)
        corr = max((aligned_corr(p, cand)[0] for p in projs), default=0.0)
        if corr < max_corr:
            chosen.append((float(rot[0]), float(tilt[0])))
            projs.append(cand[0])
            if twin_corr is not None and len(chosen) == 1 and len(counts) > 1:
                rot1, tilt1, proj1 = _twin(atoms, chosen[0], projs[0], twin_corr, D)
                chosen.append((rot1, tilt1))
                projs.append(proj1)
            worst = max(worst, corr)
    if len(chosen) < len(counts):
        raise RuntimeError(f"only {len(chosen)} views with aligned correlation < {max_corr}")
    n = int(sum(counts))
    view = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    psi = rng.uniform(0, 360, n)
    shift = np.clip(rng.normal(0, shift_sd, (n, 2)), -shift_max, shift_max)
    ang = np.asarray(chosen)
    R = euler_to_matrix(ang[view, 0], ang[view, 1], psi)
    clean = project_atoms(atoms, R, shift, D)
    du = rng.uniform(10000, 25000, n)
    dv = du - rng.uniform(0, 500, n)
    da = rng.uniform(0, 180, n)
    ctf = ctf_2d(D, pixel_size, du, dv, da, voltage_kv=VOLTAGE, cs_mm=CS, amplitude_contrast=Q0)
    signal = apply_ctf(clean, ctf)
    radius = float(np.linalg.norm(atoms.positions, axis=1).max() + 2 * atoms.sigmas.max())
    signal_var = float(disk_signal_variance(signal, radius).mean())
    noise_var = signal_var / snr
    images = (signal + rng.normal(0, np.sqrt(noise_var), signal.shape)).astype(np.float32)
    return ViewSet(images, view, psi, shift, du, dv, da, np.stack(projs), ang, noise_var,
                   pixel_size, worst, atoms, signal_var)


def _twin(atoms: Atoms, view: tuple[float, float], proj: np.ndarray, corr: float,
          D: int) -> tuple[float, float, np.ndarray]:
    """(rot, tilt, projection at psi 0) of the view tilted away from ``view`` by the smallest
    whole degree whose in-plane-aligned correlation with ``proj`` is <= corr."""
    psi_probe = np.arange(0, 360, 2.0)
    for d in range(1, 90):
        tilt = view[1] + d
        R = euler_to_matrix(np.full(psi_probe.size, view[0]), tilt, psi_probe)
        cand = project_atoms(atoms, R, np.zeros((psi_probe.size, 2)), D)
        if aligned_corr(proj, cand)[0] <= corr:
            return view[0], tilt, cand[0]
    raise RuntimeError(f"no tilt within 90 deg reaches correlation {corr}")


def band_ctf(vs: ViewSet, idx: np.ndarray, band: Band, pixel_size: float) -> np.ndarray:
    """CTF (B, nF) of particles idx on a band of a (possibly cropped) box of pixel_size Å/px."""
    return ctf_2d(band.D, pixel_size, vs.defocus_u[idx], vs.defocus_v[idx], vs.defocus_angle[idx],
                  voltage_kv=VOLTAGE, cs_mm=CS, amplitude_contrast=Q0, band=band)


def edge_images(n: int, D: int, rng: np.random.Generator, width_px: float = 1.5) -> np.ndarray:
    """"Gold edge" junk (n, D, D) float32: a soft step across the box at a random angle and
    offset (|offset| <= D/4 px from the centre), 0 on one side and 1 on the other."""
    g = np.arange(D) - D // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    phi = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    d = rng.uniform(-D / 4, D / 4, n)[:, None, None]
    u = (x * np.cos(phi) + y * np.sin(phi) - d) / width_px
    return (0.5 * (1 + np.tanh(u))).astype(np.float32)


def add_junk(vs: ViewSet, clean: np.ndarray, contrast: float, seed: int) -> ViewSet:
    """vs plus junk particles: CTF-free images ``clean`` (n, D, D) scaled so that their signal
    standard deviation in the particle disc is ``contrast`` x the particles', with random CTFs
    and the same noise; junk gets the label V (= number of views), psi 0, shift 0; shuffled."""
    rng = np.random.default_rng(seed)
    n, D = clean.shape[0], clean.shape[-1]
    radius = float(np.linalg.norm(vs.atoms.positions, axis=1).max() + 2 * vs.atoms.sigmas.max())
    du = rng.uniform(10000, 25000, n)
    dv = du - rng.uniform(0, 500, n)
    da = rng.uniform(0, 180, n)
    ctf = ctf_2d(D, vs.pixel_size, du, dv, da, voltage_kv=VOLTAGE, cs_mm=CS, amplitude_contrast=Q0)
    centred = clean - clean.mean(axis=(1, 2), keepdims=True)
    signal = apply_ctf(centred, ctf)
    signal *= contrast * np.sqrt(vs.signal_var / disk_signal_variance(signal, radius))[:, None, None]
    junk = signal + rng.normal(0, np.sqrt(vs.noise_var), signal.shape)
    order = rng.permutation(vs.view.size + n)
    V = vs.views.shape[0]

    def cat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, b])[order]

    return ViewSet(cat(vs.images, junk.astype(np.float32)), cat(vs.view, np.full(n, V)),
                   cat(vs.psi, np.zeros(n)), cat(vs.shift, np.zeros((n, 2))), cat(vs.defocus_u, du),
                   cat(vs.defocus_v, dv), cat(vs.defocus_angle, da), vs.views, vs.view_angles,
                   vs.noise_var, vs.pixel_size, vs.max_view_corr, vs.atoms, vs.signal_var)
