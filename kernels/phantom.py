"""Pseudo-atom phantoms and an analytic image simulator (algorithms.md §11).

A phantom is a sum of isotropic 3D Gaussian "atoms". Positions are in pixels relative to the
box centre (index D//2), in (x, y, z) order; sigmas in pixels; an amplitude is the integrated
mass of its atom. Everything here is arrays in, arrays out.

Projection convention (RELION): the image of pose A is the z-projection of the volume rotated
by A, img(x, y) = ∫ V(A^T (x, y, z)) dz, so an atom centred at c projects to (A c)[:2]; its
2D Fourier transform samples the 3D one at A^T (kx, ky, 0). A shift t moves the content by +t.
Sampling is by point values of the continuous Gaussians, so `render_volume(...).sum(axis=0)`
equals the analytic projection up to the (negligible for sigma >= 1 px) aliasing of the z-sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.backend import xp_of
from kernels.fourier import freqs_2d, irfft2c, rfft2c

_SQRT_2PI = float(np.sqrt(2.0 * np.pi))
_CUT = 30.0  # Gaussian tails are floored at exp(-30) ~ 1e-13 of the peak


@dataclass(frozen=True)
class Atoms:
    """Gaussian atoms: positions (M, 3) or per image (N, M, 3) px (x, y, z) from the box centre;
    sigmas (M,) px; amplitudes (M,) or per image (N, M) (integrated mass; 0 = absent)."""

    positions: np.ndarray
    sigmas: np.ndarray
    amplitudes: np.ndarray


@dataclass(frozen=True)
class Phantom:
    """An asymmetric protein-like phantom: atoms grouped into compact domains.

    domain: (M,) int domain label per atom; centres: (n_domains, 3) px domain centres."""

    atoms: Atoms
    domain: np.ndarray
    centres: np.ndarray


@dataclass(frozen=True)
class State:
    """A discrete conformation: which atoms are present and how far each is displaced (px)."""

    present: np.ndarray  # (M,) bool
    displacement: np.ndarray  # (M, 3) px


@dataclass(frozen=True)
class Motion:
    """Continuous motion: the masked atoms rotate about `axis` through `pivot` (px) by
    t * max_angle_deg for a per-particle t (t in [-1, 1] by design)."""

    mask: np.ndarray  # (M,) bool
    axis: np.ndarray  # (3,) unit vector
    pivot: np.ndarray  # (3,) px
    max_angle_deg: float


def make_phantom(
    D: int,
    rng: np.random.Generator,
    n_atoms: int = 200,
    n_domains: int = 4,
    radius_frac: float = 0.35,
    sigma_px: tuple[float, float] = (1.0, 1.6),
) -> Phantom:
    """Random asymmetric phantom: `n_domains` touching globular domains, each a random-walk
    chain of atoms (step ~1.5 px) confined to its domain ball; the whole is centred on its
    centroid and shrunk if needed so every atom centre lies within radius_frac * D of the box
    centre. Sigmas U[sigma_px]; amplitudes U[0.5, 1.5]."""
    r_max = radius_frac * D
    r_dom = r_max / (1.0 + n_domains ** (1.0 / 3.0))
    centres = [np.zeros(3)]
    while len(centres) < n_domains:
        anchor = centres[rng.integers(len(centres))]
        v = rng.normal(size=3)
        cand = anchor + 1.7 * r_dom * v / np.linalg.norm(v)
        if all(np.linalg.norm(cand - c) >= 1.5 * r_dom for c in centres):
            centres.append(cand)
    sizes = np.full(n_domains, n_atoms // n_domains)
    sizes[: n_atoms - sizes.sum()] += 1
    positions, domain = [], []
    for d, (c, n) in enumerate(zip(centres, sizes, strict=True)):
        p = c + rng.uniform(-0.3, 0.3, size=3) * r_dom
        for _ in range(n):
            for _ in range(100):
                step = rng.normal(size=3)
                q = p + 1.5 * step / np.linalg.norm(step)
                if np.linalg.norm(q - c) <= r_dom:
                    p = q
                    break
            positions.append(p)
            domain.append(d)
    pos = np.asarray(positions, dtype=np.float64)
    origin = pos.mean(axis=0)
    fit = min(1.0, r_max / np.linalg.norm(pos - origin, axis=1).max())
    pos = (pos - origin) * fit
    centres_arr = (np.asarray(centres) - origin) * fit
    atoms = Atoms(
        positions=pos,
        sigmas=rng.uniform(sigma_px[0], sigma_px[1], size=n_atoms),
        amplitudes=rng.uniform(0.5, 1.5, size=n_atoms),
    )
    return Phantom(atoms=atoms, domain=np.asarray(domain), centres=centres_arr)


def base_state(phantom: Phantom) -> State:
    """All atoms present, none displaced."""
    M = len(phantom.domain)
    return State(present=np.ones(M, dtype=bool), displacement=np.zeros((M, 3)))


def state_without(phantom: Phantom, domain: int) -> State:
    """Conformation with one domain absent."""
    s = base_state(phantom)
    return State(present=phantom.domain != domain, displacement=s.displacement)


def state_moved(phantom: Phantom, domain: int, shift_px: np.ndarray) -> State:
    """Conformation with one domain translated rigidly by shift_px (3,)."""
    s = base_state(phantom)
    disp = s.displacement.copy()
    disp[phantom.domain == domain] = np.asarray(shift_px, dtype=np.float64)
    return State(present=s.present, displacement=disp)


def hinge_motion(phantom: Phantom, domain: int, max_angle_deg: float) -> Motion:
    """Rotation of one domain about a hinge: pivot at the midpoint between the domain centre and
    the centroid of the other domains, axis perpendicular to the line joining them."""
    c = phantom.centres[domain]
    rest = np.delete(phantom.centres, domain, axis=0).mean(axis=0)
    arm = c - rest
    axis = np.cross(arm, [0.3, 0.5, 0.8])
    return Motion(
        mask=phantom.domain == domain,
        axis=axis / np.linalg.norm(axis),
        pivot=0.5 * (c + rest),
        max_angle_deg=float(max_angle_deg),
    )


def hinge_angle_for(phantom: Phantom, domain: int, rms_A: float, pixel_size: float) -> float:
    """Largest hinge angle (deg) of ``hinge_motion`` at which the domain's atoms move by rms_A (Å,
    root mean square) between t = -1 and +1 (chord 2 r sin(angle) at distance r from the axis):
    a fixed angle moves a domain far from the others' centroid much more (demo phantoms: 11-27 Å
    at 20 deg)."""
    m = hinge_motion(phantom, domain, 1.0)
    rel = phantom.atoms.positions[m.mask] - m.pivot
    r = rel - np.outer(rel @ m.axis, m.axis)
    rms_r = np.sqrt((r ** 2).sum(axis=1).mean()) * pixel_size
    return float(np.degrees(np.arcsin(min(1.0, rms_A / (2 * rms_r)))))


def _axis_angle(axis: np.ndarray, angle_rad: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) about a fixed unit axis by angles (N,) (Rodrigues)."""
    K = np.array(
        [[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]]
    )
    s = np.sin(angle_rad)[:, None, None]
    c = np.cos(angle_rad)[:, None, None]
    return np.eye(3) + s * K + (1.0 - c) * (K @ K)


def particle_atoms(
    phantom: Phantom,
    states: list[State],
    state: np.ndarray,
    t: np.ndarray,
    motion: Motion | None = None,
) -> Atoms:
    """Per-particle atoms (positions (N, M, 3), amplitudes (N, M)) for state labels (N,) and
    motion amounts t (N,). The motion acts on the state's displaced positions."""
    base = phantom.atoms
    state = np.asarray(state)
    present = np.stack([s.present for s in states])[state]
    disp = np.stack([s.displacement for s in states])[state]
    pos = base.positions[None] + disp
    if motion is not None:
        Rm = _axis_angle(motion.axis, np.deg2rad(motion.max_angle_deg) * np.asarray(t, float))
        moved = np.einsum("nij,nmj->nmi", Rm, pos - motion.pivot) + motion.pivot
        pos = np.where(motion.mask[None, :, None], moved, pos)
    return Atoms(positions=pos, sigmas=base.sigmas, amplitudes=base.amplitudes[None] * present)


def _gauss_1d(xp, centres, sigmas, D: int, dtype=None):
    """Normalised 1D Gaussians sampled on the pixel grid: centres (..., M) px from index D//2,
    sigmas (M,) -> (..., D, M) in `dtype` (default: that of centres). Tails are floored at
    exp(-_CUT) of the peak so that products of two never become (slow) float32 denormals."""
    dtype = centres.dtype if dtype is None else dtype
    grid = xp.arange(D, dtype=dtype) - D // 2
    inv = (1.0 / sigmas).astype(dtype)
    g = grid[:, None] - centres[..., None, :].astype(dtype)
    g *= inv
    g *= g
    g *= -0.5
    xp.maximum(g, -_CUT, out=g)
    xp.exp(g, out=g)
    g *= inv / _SQRT_2PI
    return g


def render_volume(atoms: Atoms, D: int) -> np.ndarray:
    """Point-sampled sum of 3D Gaussians -> (D, D, D) float32 [z, y, x]; positions (M, 3)."""
    xp = xp_of(atoms.positions)
    pos = xp.asarray(atoms.positions, dtype=xp.float64)
    sig = xp.asarray(atoms.sigmas, dtype=xp.float64)
    gx = _gauss_1d(xp, pos[:, 0], sig, D)
    gy = _gauss_1d(xp, pos[:, 1], sig, D)
    gz = _gauss_1d(xp, pos[:, 2], sig, D) * xp.asarray(atoms.amplitudes, dtype=xp.float64)
    zy = (gz[:, None, :] * gy[None, :, :]).reshape(D * D, -1)
    return (zy @ gx.T).reshape(D, D, D).astype(xp.float32)


def project_atoms(atoms: Atoms, R: np.ndarray, shifts: np.ndarray, D: int) -> np.ndarray:
    """Analytic projections (N, D, D) float32: atom c lands at (R_i c)[:2] + shift_i (px) as a
    2D Gaussian of the same sigma and mass; rendered as (D x M) @ (M x D) per image.

    R: (N, 3, 3) RELION pose matrices; shifts: (N, 2) px (tx, ty); positions (M, 3) or
    (N, M, 3); amplitudes (M,) or (N, M)."""
    xp = xp_of(R)
    R = xp.asarray(R, dtype=xp.float64)
    pos = xp.asarray(atoms.positions, dtype=xp.float64)
    sig = xp.asarray(atoms.sigmas, dtype=xp.float64)
    amp = xp.asarray(atoms.amplitudes, dtype=xp.float64)
    xy = pos @ xp.swapaxes(R[:, :2, :], -1, -2)  # (N, M, 2)
    xy = xy + xp.asarray(shifts, dtype=xp.float64)[:, None, :]
    gx = _gauss_1d(xp, xy[..., 0], sig, D, xp.float32)
    gy = _gauss_1d(xp, xy[..., 1], sig, D, xp.float32)
    gy *= (amp if amp.ndim == 1 else amp[:, None, :]).astype(xp.float32)
    # einsum, not a batched BLAS matmul: many tiny GEMMs thrash a multi-threaded BLAS on a
    # busy CPU (measured 8x slower under contention)
    return xp.einsum("nym,nxm->nyx", gy, gx)


def project_difference(
    atoms_a: Atoms, atoms_b: Atoms, R: np.ndarray, shifts: np.ndarray, D: int
) -> np.ndarray:
    """Projections (N, D, D) of (a - b) for two atom sets of the same phantom (same M and sigmas),
    rendering only the atoms that differ between a and b in some image."""
    N, M = R.shape[0], len(atoms_a.sigmas)
    pa = np.broadcast_to(atoms_a.positions, (N, M, 3))
    pb = np.broadcast_to(atoms_b.positions, (N, M, 3))
    aa = np.broadcast_to(atoms_a.amplitudes, (N, M))
    ab = np.broadcast_to(atoms_b.amplitudes, (N, M))
    diff = np.any(pa != pb, axis=(0, 2)) | np.any(aa != ab, axis=0)
    both = Atoms(
        positions=np.concatenate([pa[:, diff], pb[:, diff]], axis=1),
        sigmas=np.tile(atoms_a.sigmas[diff], 2),
        amplitudes=np.concatenate([aa[:, diff], -ab[:, diff]], axis=1),
    )
    return project_atoms(both, R, shifts, D)


def apply_ctf(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Multiply images (N, D, D) by half-plane CTFs (N, D, D//2+1) in Fourier space."""
    D = images.shape[-1]
    return irfft2c(rfft2c(images) * ctf, D).astype(images.dtype)


def disk_mask(D: int, radius_px: float, xp=np) -> np.ndarray:
    """Hard disk (D, D) bool of pixels within radius_px of the centre (D//2, D//2)."""
    g = xp.arange(D) - D // 2
    return (g[:, None] ** 2 + g[None, :] ** 2) <= radius_px**2


def disk_signal_variance(images: np.ndarray, radius_px: float) -> np.ndarray:
    """Per-image variance (N,) of the pixels inside the particle disk (§11.2 signal power)."""
    xp = xp_of(images)
    vals = images[:, disk_mask(images.shape[-1], radius_px, xp)].astype(xp.float64)
    return vals.var(axis=1)


def half_plane_weights(D: int, r_max: float | None = None, xp=np) -> np.ndarray:
    """Weights (D, D//2+1) of the half-plane FT pixels with 0 < |k| < r_max (default D/2): 1 on
    the kx = 0 column, 2 elsewhere (each stands for itself and its Hermitian mate), 0 outside."""
    ky, kx = freqs_2d(D, xp)
    r2 = kx**2 + ky**2
    return xp.where(kx == 0, 1.0, 2.0) * ((r2 > 0) & (r2 < (D / 2 if r_max is None else r_max) ** 2))


def noise_weighted_power(
    images: np.ndarray, ctf: np.ndarray | None, noise_var: float
) -> np.ndarray:
    """Oracle ||C P dV||^2 / sigma_noise^2 per image (N,) (§11.3 d_i^2, §11.4 q_i) for real-space
    white noise of variance noise_var, summed over 0 < |k| < D/2 (full-plane equivalent of the
    half-plane sum with sigma2 = D^2 noise_var / 2)."""
    xp = xp_of(images)
    D = images.shape[-1]
    F = rfft2c(images)
    if ctf is not None:
        F = F * ctf
    return (xp.abs(F) ** 2 * half_plane_weights(D, xp=xp)).sum(axis=(-2, -1)) / (D * D * noise_var)


def blob_images(n: int, D: int, rng: np.random.Generator, radius_px: float) -> np.ndarray:
    """Junk "blob" images (n, D, D) float32: each 3-12 random 2D Gaussians (sigma 2-6 px,
    masses U[0.5, 1.5]) centred uniformly within radius_px; unnormalised."""
    out = np.zeros((n, D, D), dtype=np.float32)
    for i in range(n):
        m = int(rng.integers(3, 13))
        r = radius_px * np.sqrt(rng.uniform(0, 1, m))
        phi = rng.uniform(0, 2 * np.pi, m)
        sig = rng.uniform(2.0, 6.0, m)
        gx = _gauss_1d(np, r * np.cos(phi), sig, D)
        gy = _gauss_1d(np, r * np.sin(phi), sig, D) * rng.uniform(0.5, 1.5, m)
        out[i] = gy @ gx.T
    return out
