"""Multi-class 3D E-step and M-step building blocks shared by ab-initio and heterogeneous
refinement (algorithms.md §1.5-§1.9, §5.3, §7.2).

Particles X (B, nF) are band coefficients at the working box D for a ``Band`` that may be a
sub-band of the full one (the resolution of the iteration); C (B, nF) their CTFs (times the
per-particle scale); sigma2 (D//2,) the noise variance per real component per shell of the
working box. Volumes are real (D, D, D) float32 maps at the working box; ``prepare_volume``
turns them into the padded FTs the searches project.

E-step: ``global_search`` (coarse-to-fine over SO(3) x shifts, kernels/align3d.py) for every
class with the pruned pose set; the class evidence is the log-sum-exp of the last level's
logits (marginalisation over poses), so p_ik = softmax_k(lse_ik + log pi_k) at the iteration's
temperature. M-step: the significant poses of each class are back-projected with weights
p_ik * gamma (``insert_marginal``) and noise weights 1/sigma2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.align3d import KeepPolicy, PoseSet, SearchResult, global_search, insert_marginal, shell_power
from kernels.backend import to_host, xp_of
from kernels.fourier import Band, freqs_3d, irfft3c, rfft3c, soft_spherical_mask
from kernels.grids import so3_step_deg
from kernels.noise import sigma2_per_shell
from kernels.posterior import class_posteriors
from kernels.projection import VolumeFT, prepare_volume, project
from kernels.reconstruction import Accumulator3D
from kernels.scoring import particle_phases

#: Noise-model shrinkage weight (images) towards the initial spectrum (cryoSPARC noise priorw).
NOISE_PRIOR_WEIGHT = 50.0


@dataclass(frozen=True)
class SearchPlan:
    """Pose search of one iteration: HEALPix orders order0 .. order0 + n_levels - 1, shifts in
    a disc of shift_extent px on a grid of shift_step px, keep policy of the pruned sets."""

    order0: int
    n_levels: int
    shift_extent: float
    shift_step: float = 1.0
    max_keep: int = 32
    min_keep: int = 8


def plan_for(r: float, shift_extent: float, max_order: int = 4, min_order: int = 2,
             shift_step: float = 0.5) -> SearchPlan:
    """Coarse-to-fine search from HEALPix order ``min_order`` to the coarsest order whose step
    is <= 1 / r rad (one Nyquist step at band radius r px), clipped to ``max_order``; shifts on
    a grid of ``shift_step`` px in a disc of shift_extent px.

    Measured on the 3-state test set (D = 24, r = 8, SNR 3, 300 particles, true maps): class
    ARI / median pose error 0.742 / 10.9 deg in 23 s for one exhaustive order-3 level with
    1 px shifts, 0.903 / 5.3 deg in 12 s for orders 2-3-4 with 0.5 px shifts: the sampling,
    not the data, limited the classification."""
    need = math.degrees(1.0 / max(r, 1.0))
    order = min_order
    while order < max_order and so3_step_deg(order) > need:
        order += 1
    return SearchPlan(min_order, order - min_order + 1, max(shift_extent, 1.0), shift_step)


@dataclass
class EStep3D:
    """E-step of a batch: best poses and pose sets per class (``SearchResult``), class
    posteriors p (B, K) float64, class ESS (B,), class log evidence lse (B, K) (host)."""

    result: SearchResult
    p: np.ndarray
    class_ess: np.ndarray
    lse: np.ndarray


def noise_weights(sigma2: Any, band: Band) -> Any:
    """1/sigma2 per band pixel (nF,) float64 (without the band's kx = 0 factor)."""
    xp = xp_of(sigma2)
    return 1.0 / xp.asarray(sigma2, dtype=xp.float64)[band.on(xp, "shell")]


def expectation(X: Any, C: Any, sigma2: Any, band: Band, vfts: Sequence[VolumeFT], log_pi: Any,
                plan: SearchPlan, temperature: float = 1.0) -> EStep3D:
    """Pose search against every class and class posteriors (see module doc)."""
    xp = xp_of(X)
    w = band.on(xp, "weight") * noise_weights(sigma2, band)
    res = global_search(
        X, C, w, band, list(vfts), order0=plan.order0, n_levels=plan.n_levels,
        r_start=min(float(band.r_max), 8.0), shift_extent=plan.shift_extent,
        shift_step0=plan.shift_step, shift_step=plan.shift_step,
        keep=KeepPolicy(max_keep=plan.max_keep, min_keep=plan.min_keep),
        temperature=temperature, return_poses=True,
    )
    lse = to_host(res.poses.lse).astype(np.float64)
    p, ess = class_posteriors(lse, np.asarray(to_host(log_pi), dtype=np.float64))
    return EStep3D(res, p, ess, lse)


def insert(accs: Sequence[Accumulator3D], X: Any, C: Any, e: EStep3D, band: Band, sigma2: Any,
           class_weights: np.ndarray, rows: Any = None) -> None:
    """Back-project the significant poses of every class into ``accs`` (one per class) with
    weights class_weights (B, K) x pose posterior / sigma2; ``rows`` selects particles."""
    xp = xp_of(X)
    res = e.result
    poses = res.poses
    if rows is not None:
        r = xp.asarray(rows)
        X, C, class_weights = X[r], C[r], np.asarray(class_weights)[to_host(r)]
        poses = PoseSet(poses.R[r], poses.shifts[r], poses.logits[r], poses.lse[r])
    insert_marginal(accs, X, C, poses, band, class_weights=xp.asarray(class_weights),
                    noise_weights=noise_weights(sigma2, band))


def residual_power(X: Any, C: Any, band: Band, vfts: Sequence[VolumeFT], e: EStep3D,
                   cls: np.ndarray) -> Any:
    """sum_i sum_{k in shell} w_k |X_i e^{+2 pi i k.t/D} - C_i P_A V_cls(i)|^2 per shell
    (band.n_shells,) float64 at each particle's best pose in class cls (B,) (w = the band's
    Hermitian weight): the numerator of the noise update (§1.6)."""
    xp = xp_of(X)
    out = xp.zeros(band.n_shells)
    res = e.result
    for k in np.unique(cls):
        b = np.flatnonzero(cls == k)
        bi = xp.asarray(b)
        P = project(vfts[int(k)], res.R[bi, int(k)], band).astype(xp.complex128)
        ph = particle_phases(band, res.shifts[bi, int(k)], xp).astype(xp.complex128)
        r = X[bi].astype(xp.complex128) * ph - C[bi].astype(xp.float64) * P
        pw = (r.real**2 + r.imag**2) * band.on(xp, "weight")
        out += xp.bincount(xp.broadcast_to(band.on(xp, "shell"), pw.shape).ravel(),
                           weights=pw.ravel(), minlength=band.n_shells)
    return out


def initial_noise(X: Any, band: Band, D: int) -> Any:
    """sigma2_0 (D//2,) from band data X (B, nF) (§1.6; signal included, an overestimate at low
    resolution that acts as an initial noise scale): per-shell power, extended flat beyond the
    band, the DC shell copied from shell 1."""
    xp = xp_of(X)
    s2 = to_host(sigma2_per_shell(X, band))
    s2 = np.concatenate([s2, np.full(max(0, D // 2 - s2.size), s2[-1])])[: D // 2]
    s2[0] = s2[1]
    return xp.asarray(s2)


def shell_pixels(band: Band, xp: Any) -> Any:
    """Hermitian-weighted band pixels per shell (band.n_shells,)."""
    return xp.bincount(band.on(xp, "shell"), weights=band.on(xp, "weight"), minlength=band.n_shells)


def pixel_power(resid: Any, band: Band) -> Any:
    """Residual power per shell (band.n_shells,) summed over images -> per real component
    (the unit of sigma2), summed over the same images."""
    xp = xp_of(resid)
    return resid / (2 * xp.maximum(shell_pixels(band, xp), 1e-30))


def shrink_noise(sigma2_0: Any, power: Any, n_images: Any) -> Any:
    """(W0 sigma2_0 + power) / (W0 + n_images), W0 = NOISE_PRIOR_WEIGHT images (§1.6); power
    per real component summed over n_images (``pixel_power``)."""
    return (NOISE_PRIOR_WEIGHT * sigma2_0 + power) / (NOISE_PRIOR_WEIGHT + n_images)


def update_noise(sigma2: Any, sigma2_0: Any, resid: Any, band: Band, n_images: float) -> Any:
    """Shrinkage update (§1.6) from one set of n_images residuals: shells of the band get
    ``shrink_noise``; other shells keep sigma2."""
    xp = xp_of(sigma2)
    out = xp.asarray(sigma2, dtype=xp.float64).copy()
    n = min(out.shape[0], band.n_shells)
    has = shell_pixels(band, xp)[:n] > 0
    out[:n] = xp.where(has, shrink_noise(sigma2_0[:n], pixel_power(resid, band)[:n], n_images), out[:n])
    return out


def model_tau2(vol: Any, r: int, T: float = 2.0) -> Any:
    """Prior signal variance per real component (D//2,) from the map's own power (§5.3 [I]):
    T x 0.5 x mean |V|^2 per shell, carried flat from the last shell with power into the
    shells up to r that have none yet (so the resolution can grow), 0 beyond r."""
    xp = xp_of(vol)
    power = 0.5 * T * shell_power(prepare_volume(vol))
    n = power.size
    r = min(int(r), n - 1)
    alive = np.flatnonzero(power[: r + 1] > 1e-9 * max(power.max(), 1e-300))
    out = np.zeros(n)
    if alive.size:
        last = int(alive[-1])
        out[: last + 1] = power[: last + 1]
        out[last + 1 : r + 1] = power[last]
    return xp.asarray(out)


def centre_of_mass(vol: Any) -> Any:
    """Centre of mass (3,) (x, y, z) px from the box centre of the positive density."""
    xp = xp_of(vol)
    D = vol.shape[-1]
    c = xp.arange(D, dtype=xp.float64) - D // 2
    w = xp.maximum(vol.astype(xp.float64), 0.0)
    tot = float(w.sum())
    if tot <= 0:
        return xp.zeros(3)
    return xp.stack([(w.sum(axis=(0, 1)) * c).sum(), (w.sum(axis=(0, 2)) * c).sum(),
                     (w.sum(axis=(1, 2)) * c).sum()]) / tot


def shift_volume(vol: Any, shift: Any) -> Any:
    """Volume (D, D, D) with its content moved by shift (3,) (x, y, z) px (Fourier phase ramp)."""
    xp = xp_of(vol)
    D = vol.shape[-1]
    kz, ky, kx = freqs_3d(D, xp)
    s = to_host(shift)
    ph = xp.exp(-2j * np.pi * (kx * s[0] + ky * s[1] + kz * s[2]) / D)
    return irfft3c(rfft3c(vol) * ph, D).astype(vol.dtype)


def constrain(vol: Any, window_radius_px: float, nonneg: bool, recentre: bool) -> Any:
    """Real-space constraints of ab-initio (§5.3): re-centre (centre of mass to the box centre),
    non-negativity, soft spherical window (edge 3 px)."""
    xp = xp_of(vol)
    if recentre:
        vol = shift_volume(vol, -centre_of_mass(vol))
    if nonneg:
        vol = xp.maximum(vol, 0.0)
    return (vol * soft_spherical_mask(vol.shape[-1], window_radius_px, 3.0, xp)).astype(xp.float32)

