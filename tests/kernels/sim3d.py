"""Simulated 3D particle sets with ground truth for ab-initio / heterogeneous refinement tests
(algorithms.md §5.4, §7.3, §11): states of a pseudo-atom phantom, uniform random poses,
Gaussian shifts, RELION CTF, white noise at a §11.2 SNR. ``simulate_linear``: a continuous
one-domain change V(t) = V0 + t dV for 3DVA (§9.4 V1) with the §11.4 latent oracle."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from kernels.ctf import ctf_2d
from kernels.fourier import Band, rfft2c
from kernels.phantom import (
    Atoms,
    Phantom,
    State,
    apply_ctf,
    base_state,
    disk_signal_variance,
    make_phantom,
    noise_weighted_power,
    particle_atoms,
    project_atoms,
    project_difference,
    render_volume,
    state_moved,
    state_without,
)
from kernels.rotations import random_rotations

VOLTAGE, CS, Q0 = 300.0, 2.7, 0.1


@dataclass
class Set3D:
    """images (N, D, D) float32; truth: state (N,), R (N, 3, 3), shift (N, 2) px (content moved
    by +t); defocus (N, 3) U, V (Å), angle (deg); maps (S, D, D, D) of each state; per-particle
    amplitude scale (N,) (ones unless ``simulate(scale=...)``)."""

    images: np.ndarray
    state: np.ndarray
    R: np.ndarray
    shift: np.ndarray
    defocus: np.ndarray
    maps: np.ndarray
    pixel_size: float
    noise_var: float
    scale: np.ndarray | None = None

    def load(self, idx: np.ndarray, band: Band) -> tuple[np.ndarray, np.ndarray]:
        """(X (B, nF) complex64, C (B, nF) float32) of particles idx on ``band``."""
        X = band.gather(rfft2c(self.images[idx])).astype(np.complex64)
        df = self.defocus[idx]
        C = ctf_2d(band.D, self.pixel_size, df[:, 0], df[:, 1], df[:, 2], voltage_kv=VOLTAGE,
                   cs_mm=CS, amplitude_contrast=Q0, band=band)
        return X, C.astype(np.float32)


def simulate(counts: list[int], *, D: int = 32, pixel_size: float = 6.0, snr: float = 0.1,
             seed: int = 0, shift_sd: float = 1.0, n_atoms: int = 160,
             scale: tuple[float, ...] | None = None) -> Set3D:
    """len(counts) states (<= 3: full complex, one domain removed, one domain moved by 4 px)
    of one phantom with counts[s] particles each, shuffled.
    ``scale``: values of a per-particle signal amplitude drawn uniformly at random (own random
    stream; the noise level is set from the unscaled signal)."""
    rng = np.random.default_rng(seed)
    ph = make_phantom(D, rng, n_atoms=n_atoms, n_domains=4, radius_frac=0.36)
    states: list[State] = [base_state(ph), state_without(ph, 1), state_moved(ph, 2, np.array([4.0, 0, 0]))]
    states = states[: len(counts)]
    n = int(sum(counts))
    state = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    R, shift = _poses(n, shift_sd, rng)
    atoms = particle_atoms(ph, states, state, np.zeros(n))
    signal, defocus, _, noise_var = _observe(project_atoms(atoms, R, shift, D), pixel_size, snr, rng)
    sc = np.ones(n) if scale is None else np.random.default_rng([seed, 1]).choice(np.asarray(scale, float), n)
    images = (signal * sc[:, None, None] + rng.normal(0, np.sqrt(noise_var), signal.shape)).astype(np.float32)
    maps = np.stack([_state_map(ph, states, s, D) for s in range(len(counts))])
    return Set3D(images, state, R, shift, defocus, maps, pixel_size, noise_var, sc)


def simulate_structures(counts: list[int], *, n_domains: tuple[int, ...] = (4, 2, 3), D: int = 24,
                        pixel_size: float = 8.0, snr: float = 1.0, seed: int = 11) -> Set3D:
    """Different structures (§5.4 A3): one random phantom per entry of counts (counts[s]
    particles, shuffled), all of radius 0.36 D with n_domains[s] domains. At the defaults the
    maps superposed at best (rotation, shift, hand) correlate 0.82 (4 vs 2 domains), 0.83 (4 vs 3)
    and 0.92 (2 vs 3) at 20 Å. Poses, shifts (s.d. 1 px), CTF and noise as ``simulate``."""
    rng = np.random.default_rng(seed)
    structures = [make_phantom(D, rng, n_atoms=160, n_domains=d, radius_frac=0.36) for d in n_domains[: len(counts)]]
    n = int(sum(counts))
    state = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    R, shift = _poses(n, 1.0, rng)
    clean = np.zeros((n, D, D))
    for k, ph in enumerate(structures):
        i = np.flatnonzero(state == k)
        atoms = particle_atoms(ph, [base_state(ph)], np.zeros(i.size, np.int64), np.zeros(i.size))
        clean[i] = project_atoms(atoms, R[i], shift[i], D)
    signal, defocus, _, noise_var = _observe(clean, pixel_size, snr, rng)
    images = (signal + rng.normal(0, np.sqrt(noise_var), signal.shape)).astype(np.float32)
    maps = np.stack([render_volume(ph.atoms, D) for ph in structures])
    return Set3D(images, state, R, shift, defocus, maps, pixel_size, noise_var, np.ones(n))


def _poses(n: int, shift_sd: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random rotations (n, 3, 3) and Gaussian shifts (n, 2) px clipped at 3 s.d."""
    return random_rotations(n, rng), np.clip(rng.normal(0, shift_sd, (n, 2)), -3 * shift_sd, 3 * shift_sd)


def _observe(clean: np.ndarray, pixel_size: float, snr: float,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Random defoci (N, 3) and CTFs (N, D, D//2+1) applied to clean projections (N, D, D);
    returns (signal, defocus, ctf, noise variance of the §11.2 SNR)."""
    n, D = clean.shape[0], clean.shape[-1]
    du = rng.uniform(10000, 25000, n)
    defocus = np.stack([du, du - rng.uniform(0, 500, n), rng.uniform(0, 180, n)], axis=1)
    ctf = ctf_2d(D, pixel_size, defocus[:, 0], defocus[:, 1], defocus[:, 2], voltage_kv=VOLTAGE,
                 cs_mm=CS, amplitude_contrast=Q0)
    signal = apply_ctf(clean, ctf)
    return signal, defocus, ctf, float(disk_signal_variance(signal, 0.4 * D).mean() / snr)


@dataclass
class Linear3D:
    """Continuous set: ``data`` (state 0 for all; maps V(-1), V(0), V(+1)), true t (N,) ~ U[-1, 1],
    dV (D, D, D) = (V(1) - V(-1)) / 2 (exact when only the density is scaled) and the §11.4
    oracle information q (N,) = ||C_i P_i dV||^2 / sigma2 over 0 < |k| < D/2."""

    data: Set3D
    t: np.ndarray
    dV: np.ndarray
    q: np.ndarray

    @property
    def rho_oracle(self) -> float:
        """sqrt(var t / (var t + mean 1/q)) (§11.4)."""
        v = float(np.var(self.t))
        return float(np.sqrt(v / (v + np.mean(1.0 / self.q))))


def simulate_linear(n: int, *, D: int = 32, pixel_size: float = 6.0, snr: float = 0.1, seed: int = 0,
                    shift_sd: float = 1.0, n_atoms: int = 160, domain: int = 2, scale: float = 0.0,
                    move_px: tuple[float, float, float] = (0.0, 0.0, 0.0), motion: bool = True) -> Linear3D:
    """n particles of the ``simulate`` phantom whose atoms of ``domain`` have density x (1 + scale t)
    and are moved by t x move_px (x, y, z), t ~ U[-1, 1] per particle; ``motion=False`` gives the
    homogeneous set V(0) with the same poses, CTFs and noise level (the null set of §9.4 V5)."""
    rng = np.random.default_rng(seed)
    ph = make_phantom(D, rng, n_atoms=n_atoms, n_domains=4, radius_frac=0.36)
    t = rng.uniform(-1.0, 1.0, n)
    R, shift = _poses(n, shift_sd, rng)

    def atoms(tt: np.ndarray) -> Atoms:
        a = ph.atoms
        sel = (ph.domain == domain)[None, :]
        pos = a.positions[None] + np.where(sel[..., None], tt[:, None, None] * np.asarray(move_px), 0.0)
        return Atoms(pos, a.sigmas, a.amplitudes[None] * np.where(sel, 1.0 + scale * tt[:, None], 1.0))

    clean = project_atoms(atoms(t if motion else np.zeros(n)), R, shift, D)
    signal, defocus, ctf, noise_var = _observe(clean, pixel_size, snr, rng)
    images = (signal + rng.normal(0, np.sqrt(noise_var), signal.shape)).astype(np.float32)
    ends = atoms(np.array([-1.0, 0.0, 1.0]))
    maps = np.stack([render_volume(Atoms(ends.positions[i], ends.sigmas, ends.amplitudes[i]), D) for i in range(3)])
    dproj = project_difference(atoms(np.ones(n)), atoms(-np.ones(n)), R, shift, D) / 2
    q = noise_weighted_power(dproj, ctf, noise_var)
    data = Set3D(images, np.zeros(n, np.int64), R, shift, defocus, maps, pixel_size, noise_var, np.ones(n))
    return Linear3D(data if motion else replace(data, maps=maps[[1, 1, 1]]), t, (maps[2] - maps[0]) / 2, q)


def _state_map(ph: Phantom, states: list[State], s: int, D: int) -> np.ndarray:
    """Map (D, D, D) of state s."""
    atoms = particle_atoms(ph, states, np.array([s]), np.zeros(1))
    return render_volume(Atoms(atoms.positions[0], ph.atoms.sigmas, atoms.amplitudes[0]), D)
