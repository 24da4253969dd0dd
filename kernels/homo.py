"""Gold-standard homogeneous refinement (algorithms.md §6; cryoSPARC "Homogeneous Refinement",
RELION 3D auto-refine).

Particles are split once into halves (persistent; an input split is kept) and each half is
refined against its own map V_h by full EM passes over all particles, streamed in chunks
through a loader ``load(idx, band) -> (X (B, nF) complex64, C (B, nF) float32)``:

  start     V_A = V_B = V_init low-passed to r_init (30 Å); greyscale: the map is first scaled
            so that its CTF-modulated projections at random poses carry the data's band power
            (an upper bound: scores then favour correlation over norm), then twice set to the
            median per-particle least-squares scale (§1.13) at the best poses of a coarse
            search of <= ``greyscale_particles`` particles on the r_init band
            (kernels/greyscale.py). sigma2_0 from the data power, the band of r_init from
            those searches' residuals.
  E-step    per half against V_h x mask on the band r_t (DC excluded): global coarse-to-fine
            search (``align3d.global_search``, HEALPix order0 .. order, shifts in a disc of
            ``shift_extent_px``) while the angular step is > ``local_step_deg``, then local
            searches (``align3d.local_search``) around the previous pose on a lattice of the
            step with a Gaussian prior of sigma = 1 step within 2 sigma (shift lattice
            step = the displacement one angular step causes at the particle radius, in
            [0.1, 1] px). ``research_at_full_band`` [I]: the first pass whose band reaches
            Nyquist - 1 searches globally (order0 .. order), once more if it would have been
            local (a global pass on that band counts as the re-search), as cryoSPARC searches
            globally every iteration: poses trapped since the first, low-resolution pass
            get out (demo consensus: > 15 deg off 16% -> 12%, flipped 3.0% -> 1.8%; +30 s).
            Temperature c_t^2, c_t = sigma_scale^(1 - t / anneal_iters) -> 1.
            Optional per-particle scale alpha_i (least squares at the best pose on the band
            ``scale_low_res_A`` .. r_t, clipped to [0.2, 5] x the median of the particles
            searched together; used with the CTF in scores and back-projection; normalised to
            mean 1 after each pass, which rescales the accumulators exactly: B / m, W / m^2).
  M-step    maximisation (best pose, default) or marginalisation over the significant pose set
            into the half accumulators (noise weights 1/sigma2); point-group symmetrisation;
            low-resolution join: shells < r_split (GSFSC split, 20 Å) of both halves hold the
            sum of both; FSC of the unregularised half maps: unmasked, masked (current mask)
            and corrected by phase randomisation beyond the shell where the unmasked FSC
            falls below 0.8 (Chen 2013); resolution = first 0.143 crossing of the corrected
            curve; tau2 from it per half (§1.5); V_h = Wiener(acc_h, tau2_h). Noise model:
            shrinkage update from the best-pose residuals (refine3d.update_noise).
  mask      soft spherical (particle diameter) until the resolution passes
            ``mask_start_res_A``, then (``mask_mode`` "dynamic") re-made every iteration from
            the mean half map (kernels/masks.py: threshold x max, near, far); "static": the
            given mask throughout; "none": the sphere throughout. The final pass always uses
            the dynamic mask in dynamic mode.
  schedule  band r_{t+1} = shell(res) + ``incr_shells`` (+ D/8 when the FSC at the band edge
            is > 0.2 and the mean max posterior > 0.1), within [r_init, D/2 - 1] (RELION);
            HEALPix order = the one whose step is nearest (log scale) half of RELION's step
            360 / ceil(pi x diameter x s_align) (one oversampling), never decreasing, at least
            order0 + 1. An iteration "stalls" when the resolution gained no whole shell and the
            mean angular and shift changes are small (< 0.4 step or within 3% of the smallest
            so far, §1.14) at temperature 1; a stall halves the step (order + 1) unless the
            sampling is fine enough (step <= ``min_step_deg`` or <= the median posterior
            angular s.d. of the particles), in which case the refinement has converged.
  final     ``iterate(final=True)`` passes (the caller runs 1 + the extra final passes after
            convergence) on the whole band (Nyquist), halves still independent; the
            full map is Wiener(acc_A + acc_B) with tau2 from FSC_full = 2F/(1+F) (SSNR-exact,
            §1.5); Guinier B on 10 Å .. resolution of the masked mean half map
            (kernels/sharpen.py); sharpened = full x exp(+B s^2/4) low-passed at the resolution.

Memory: two padded accumulators, two maps and the mask, one chunk; per particle only the
pose (R, shift), scale, half and max posterior.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kernels.align3d import (
    KeepPolicy,
    SearchResult,
    global_search,
    insert_best,
    insert_marginal,
    local_search,
    pose_weights,
)
from kernels.backend import to_host
from kernels.fourier import Band, lowpass, soft_spherical_mask
from kernels.fsc import fsc, fsc_corrected_phase_randomised, resolution_at
from kernels.greyscale import ls_scales, match_greyscale
from kernels.grids import so3_step_deg
from kernels.masks import threshold_mask
from kernels.projection import VolumeFT, prepare_volume
from kernels.reconstruction import Accumulator3D, tau2_from_fsc, wiener
from kernels.refine3d import EStep3D, initial_noise, noise_weights, residual_power, update_noise
from kernels.rotations import angular_distance_deg
from kernels.sharpen import GuinierFit, guinier_fit, sharpen
from kernels.symmetry import point_group

Loader = Callable[[np.ndarray, Band], tuple[Any, Any]]

#: Local searches: prior sigma in steps and search radius in sigmas: a lattice radius of 2 steps
#: (33 rotations x 13 shifts; 3 steps costs 4-8x more on 2 cores for the same result at the
#: accuracy the previous, twice coarser step left).
LOCAL_SIGMA_STEPS = 1.0
LOCAL_N_SIGMA = 2.0
#: Survivors of the global search levels: half the fine-level cost of 32 / 16 (align3d's bound
#: for keeping the exhaustive argmax of ~99% of particles in one search); the same maps and pose
#: errors on the tests' set, as each iteration searches again.
KEEP = KeepPolicy(max_keep=16, min_keep=8)
#: RELION's randomise-at threshold of the unmasked FSC for the phase-randomisation correction.
RANDOMISE_AT_FSC = 0.8
MASK_MODES = ("dynamic", "static", "none")
FSC_KINDS = ("unmasked", "masked", "corrected")


@dataclass(frozen=True)
class Settings:
    """Options: shells of the working box D (pixel_size Å/px), angles in degrees, shifts in px."""

    D: int
    pixel_size: float
    particle_diameter_A: float
    r_init: int
    r_split: int
    marginalise: bool = False
    per_particle_scale: bool = False
    scale_low_res_A: float = 20.0
    greyscale: bool = True
    greyscale_particles: int = 1000
    sigma_scale: float = 3.0
    anneal_iters: int = 3
    shift_extent_px: float = 3.0
    symmetry: str = "C1"
    mask_mode: str = "dynamic"
    mask_threshold: float = 0.2
    mask_near_A: float = 6.0
    mask_far_A: float = 14.0
    mask_start_res_A: float = 12.0
    incr_shells: int = 10
    order0: int = 2
    local_step_deg: float = 3.75
    research_at_full_band: bool = True
    min_step_deg: float = 0.5
    chunk: int = 1000

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if not 1 <= self.r_init <= self.r_max:
            raise ValueError(f"r_init {self.r_init} must be in [1, {self.r_max}]")

    @property
    def r_max(self) -> int:
        return self.D // 2 - 1

    def temperature(self, t: int) -> float:
        if t >= self.anneal_iters:
            return 1.0
        return float(self.sigma_scale ** (2.0 * (1.0 - t / self.anneal_iters)))

    def order_for(self, r: int) -> int:
        """HEALPix order of the search at band radius r (module doc)."""
        s_align = r / (self.D * self.pixel_size)
        step = 360.0 / max(1, math.ceil(math.pi * self.particle_diameter_A * s_align)) / 2.0
        return max(self.order0 + 1, round(math.log2(60.0 / step)))

    def shift_step(self, step_deg: float) -> float:
        """Shift lattice (px) of local searches at an angular step."""
        radius_px = self.particle_diameter_A / (2.0 * self.pixel_size)
        return float(np.clip(math.radians(step_deg) * radius_px, 0.1, 1.0))


@dataclass
class Result:
    """Final maps (D, D, D) on the engine's array module: unregularised half maps, Wiener full
    map, sharpened map, mask; FSC curves (D//2,) by kind; resolution (Å); Guinier fit or None."""

    half_a: Any
    half_b: Any
    full: Any
    sharpened: Any
    mask: Any
    fsc: dict[str, np.ndarray]
    resolution_A: float
    guinier: GuinierFit | None


class HomoRefine:
    """State: half maps ``vols`` (2, D, D, D), mask, noise model, schedule (band ``r``, HEALPix
    ``order``), last accumulators; per particle: half (0/1), R (N, 3, 3), shift (N, 2) px,
    scale alpha (N,), max posterior pmax (N,) (host arrays)."""

    def __init__(self, settings: Settings, xp: ModuleType, n_particles: int, seed: int,
                 halves: np.ndarray | None = None, mask: Any = None) -> None:
        s = settings
        self.s, self.xp, self.N, self.seed = s, xp, n_particles, seed
        D = s.D
        if halves is None:
            halves = np.random.default_rng([seed, 11]).permutation(n_particles) % 2
        self.half = np.asarray(halves, dtype=np.int64)
        if self.half.shape != (n_particles,) or not np.isin(self.half, (0, 1)).all():
            raise ValueError("halves must be (N,) values in {0, 1}")
        if min(np.bincount(self.half, minlength=2)) < 1:
            raise ValueError("both halves need particles")
        if s.mask_mode == "static" and mask is None:
            raise ValueError("mask_mode 'static' needs a mask")
        self.sphere = soft_spherical_mask(D, min(s.particle_diameter_A / (2 * s.pixel_size), D / 2 - 2), 2.0, xp)
        self.mask = xp.asarray(mask, dtype=xp.float32) if s.mask_mode == "static" else self.sphere
        self.dynamic = False
        self.ops = point_group(s.symmetry)
        self.vols = xp.zeros((2, D, D, D), dtype=xp.float32)
        self.sigma2 = xp.ones(D // 2)
        self.sigma2_0 = xp.ones(D // 2)
        self.R = np.tile(np.eye(3), (n_particles, 1, 1))
        self.shifts = np.zeros((n_particles, 2))
        self.alpha = np.ones(n_particles)
        self.pmax = np.zeros(n_particles)
        self.has_poses = False
        self.r = s.r_init
        self.order = s.order_for(s.r_init)
        self.fsc = {k: np.zeros(D // 2) for k in FSC_KINDS}
        self.resolution = math.inf
        self.best_res = math.inf
        self.n_wo_gain = 0
        self.min_changes = (math.inf, math.inf)
        self.converged = False
        self.researched = False
        self.greyscale = 1.0
        self.accs = [Accumulator3D(D, 2, xp) for _ in range(2)]

    @property
    def step(self) -> float:
        """Angular step (deg) of the current search."""
        return so3_step_deg(self.order)

    # ------------------------------------------------------------------ start

    def initialise(self, volume: Any, load: Loader) -> None:
        """Both half maps = volume (D, D, D) low-passed to r_init, greyscale, noise (module doc)."""
        s, xp = self.s, self.xp
        v0 = lowpass(xp.asarray(volume, dtype=xp.float32), s.r_init, 2.0)
        rng = np.random.default_rng([self.seed, 12])
        idx = np.sort(rng.choice(self.N, min(self.N, s.greyscale_particles), replace=False))
        full = Band(s.D, s.r_max)
        X, _ = load(idx, full)
        self.sigma2_0 = initial_noise(X, full, s.D)
        self.sigma2 = self.sigma2_0.copy()
        band = Band(s.D, s.r_init)
        X, C = load(idx, band)
        if s.greyscale:
            self.greyscale, res = match_greyscale(X, C, band, v0, self.mask, self.sigma2,
                                                  lambda vft: self._coarse_search(X, C, band, vft), rng)
            v0 = v0 * self.greyscale
        else:
            res = self._coarse_search(X, C, band, prepare_volume(v0 * self.mask))
        e = EStep3D(res, np.ones((idx.size, 1)), np.ones(idx.size), np.zeros((idx.size, 1)))
        resid = residual_power(X, C, band, [prepare_volume(v0 * self.mask)], e, np.zeros(idx.size, np.int64))
        self.sigma2 = update_noise(self.sigma2, self.sigma2_0, resid, band, idx.size)
        self.vols = xp.stack([v0, v0]).astype(xp.float32)

    def _coarse_search(self, X: Any, C: Any, band: Band, vft: VolumeFT) -> SearchResult:
        """Best poses of a coarse global search (orders order0 .. order0 + 1) on ``band``."""
        s, xp = self.s, self.xp
        w = band.on(xp, "weight") * noise_weights(self.sigma2, band)
        return global_search(X, C, w, band, vft, order0=s.order0, n_levels=2, r_start=self._r_start(band),
                             shift_extent=s.shift_extent_px, **self._global_shifts(2), keep=KEEP,
                             temperature=s.temperature(0))

    # ------------------------------------------------------------------ E-step

    def _global_shifts(self, n_levels: int) -> dict[str, float]:
        step0 = 2.0 if self.s.shift_extent_px >= 6.0 else 1.0
        return {"shift_step0": step0, "shift_step": max(0.5, step0 / 2 ** (n_levels - 1))}

    def _search(self, X: Any, C: Any, w: Any, band: Band, vft: VolumeFT, sel: np.ndarray,
                temperature: float, local: bool) -> SearchResult:
        """Local search around the poses of particles ``sel`` or global search (module doc)."""
        s, xp = self.s, self.xp
        if local:
            ts = s.shift_step(self.step)
            return local_search(X, C, w, band, vft, self.R[sel], xp.asarray(self.shifts[sel]),
                                sigma_deg=LOCAL_SIGMA_STEPS * self.step, step_deg=self.step,
                                shift_sigma=LOCAL_SIGMA_STEPS * ts, shift_step=ts, n_sigma=LOCAL_N_SIGMA,
                                temperature=temperature, max_keep=KEEP.max_keep, return_poses=True)
        n_levels = max(1, self.order - s.order0 + 1)
        return global_search(X, C, w, band, vft, order0=s.order0, n_levels=n_levels, r_start=self._r_start(band),
                             shift_extent=s.shift_extent_px, **self._global_shifts(n_levels), keep=KEEP,
                             temperature=temperature, return_poses=True)

    def _r_start(self, band: Band) -> float:
        """Band of the coarsest level: 2 / step0 (rad) shells, the radius where its angular step
        moves the edge of the band by two Fourier pixels (``refine3d.plan_for``)."""
        return min(float(band.r_max), 2.0 / math.radians(so3_step_deg(self.s.order0)))

    def iterate(self, t: int, load: Loader, final: bool = False) -> dict[str, Any]:
        """One full EM pass over all particles (``final``: on the whole band at temperature 1,
        no schedule update); returns metrics."""
        s, xp = self.s, self.xp
        if final and s.mask_mode == "dynamic":
            self._update_mask(force=True)
        band = Band(s.D, s.r_max if final else self.r)
        temperature = 1.0 if final else s.temperature(t)
        research = (s.research_at_full_band and not final and self.has_poses and not self.researched
                    and self.r == s.r_max)
        local = self.has_poses and self.step <= s.local_step_deg and not research
        self.researched |= self.r == s.r_max and not local
        refs = [prepare_volume(v * self.mask) for v in self.vols]
        nw = noise_weights(self.sigma2, band)
        w = band.on(xp, "weight") * nw
        r_lo = min(s.D * s.pixel_size / s.scale_low_res_A, band.r_max / 2)
        accs = [Accumulator3D(s.D, 2, xp) for _ in range(2)]
        resid = xp.zeros(band.n_shells)
        d_ang, d_t, sd = np.zeros(self.N), np.zeros(self.N), np.zeros(self.N)
        for i0 in range(0, self.N, s.chunk):
            idx = np.arange(i0, min(i0 + s.chunk, self.N))
            X, C = load(idx, band)
            for h in (0, 1):
                rows = np.flatnonzero(self.half[idx] == h)
                if rows.size == 0:
                    continue
                sel, rr = idx[rows], xp.asarray(rows)
                Xh, Ch = X[rr], C[rr]
                res = self._search(Xh, Ch * xp.asarray(self.alpha[sel], dtype=xp.float32)[:, None], w, band,
                                   refs[h], sel, temperature, local)
                if s.per_particle_scale:
                    self.alpha[sel] = ls_scales(Xh, Ch, band, refs[h], res.R[:, 0], res.shifts[:, 0], self.sigma2, r_lo)
                Ca = Ch * xp.asarray(self.alpha[sel], dtype=xp.float32)[:, None]
                if s.marginalise:
                    insert_marginal([accs[h]], Xh, Ca, res.poses, band, noise_weights=nw)
                else:
                    insert_best([accs[h]], Xh, Ca, res, band, noise_weights=nw)
                e = EStep3D(res, np.ones((rows.size, 1)), np.ones(rows.size), np.zeros((rows.size, 1)))
                resid += residual_power(Xh, Ca, band, [refs[h]], e, np.zeros(rows.size, np.int64))
                R, tt = to_host(res.R[:, 0]), to_host(res.shifts[:, 0])
                d_ang[sel] = angular_distance_deg(R, self.R[sel])
                d_t[sel] = np.linalg.norm(tt - self.shifts[sel], axis=1)
                self.R[sel], self.shifts[sel] = R, tt
                self.pmax[sel], sd[sel] = _posterior_stats(res)
        self.sigma2 = update_noise(self.sigma2, self.sigma2_0, resid, band, self.N)
        if s.per_particle_scale:
            m = float(self.alpha.mean())
            self.alpha /= m
            for a in accs:
                a.data /= m
                a.weight /= m * m
        self._maximise(accs, band.r_max, t)
        changes = (float(d_ang.mean()), float(d_t.mean())) if self.has_poses else (math.inf, math.inf)
        metrics = {"resolution_A": round(self.resolution, 3), "band_shells": int(band.r_max),
                   "step_deg": self.step, "local_search": int(local), "temperature": temperature,
                   "angle_change_deg": changes[0], "shift_change_px": changes[1],
                   "mean_pmax": float(self.pmax.mean()), "pose_sd_deg": float(np.median(sd)),
                   "mask_dynamic": int(self.dynamic)}
        if not final:
            self._schedule(t, changes, float(np.median(sd)))
        self.has_poses = True
        if s.mask_mode == "dynamic":
            self._update_mask(force=False)
        return metrics

    # ------------------------------------------------------------------ M-step

    def full_accumulator(self) -> Accumulator3D:
        """acc_A + acc_B of the last pass, counting the joined low shells once."""
        full = Accumulator3D(self.s.D, 2, self.xp)
        full.add(self.accs[0])
        full.add(self.accs[1])
        low = full.shells() < self.s.r_split
        full.data[low] = self.accs[0].data[low]
        full.weight[low] = self.accs[0].weight[low]
        return full

    def _maximise(self, accs: list[Accumulator3D], r_band: int, t: int) -> None:
        """Symmetrise, join low shells, FSCs, resolution, Wiener half maps (module doc)."""
        s, xp = self.s, self.xp
        if len(self.ops) > 1:
            for a in accs:
                a.symmetrize(self.ops)
        low = accs[0].shells() < s.r_split
        for part in ("data", "weight"):
            joined = getattr(accs[0], part)[low] + getattr(accs[1], part)[low]
            for a in accs:
                getattr(a, part)[low] = joined
        self.accs = accs
        raw = [wiener(a) for a in accs]
        unmasked = to_host(fsc(raw[0], raw[1]))
        below = np.flatnonzero(unmasked[1:] < RANDOMISE_AT_FSC)
        start = int(below[0]) + 1 if below.size else r_band
        rng = np.random.default_rng([self.seed, 13, t])
        curves = [unmasked, to_host(fsc(raw[0], raw[1], self.mask)),
                  to_host(fsc_corrected_phase_randomised(raw[0], raw[1], self.mask, start, rng))]
        for c in curves:
            c[r_band + 1 :] = 0.0  # nothing was back-projected beyond the band
        self.fsc = dict(zip(FSC_KINDS, curves, strict=True))
        self.resolution = resolution_at(self.fsc["corrected"], 0.143, s.D, s.pixel_size)
        corr = xp.asarray(self.fsc["corrected"])
        self.vols = xp.stack([wiener(a, tau2_from_fsc(corr, a)) for a in accs])

    def _update_mask(self, force: bool) -> None:
        s = self.s
        if force or self.dynamic or self.resolution < s.mask_start_res_A:
            self.dynamic = True
            self.mask = threshold_mask(self.vols.mean(axis=0), s.mask_threshold, s.mask_near_A / s.pixel_size,
                                       s.mask_far_A / s.pixel_size)

    def _schedule(self, t: int, changes: tuple[float, float], pose_sd: float) -> None:
        """Band, sampling and convergence for the next iteration (module doc)."""
        s = self.s
        gain = _shell(s, self.resolution) > _shell(s, self.best_res)
        self.best_res = min(self.best_res, self.resolution)
        self.n_wo_gain = 0 if gain else self.n_wo_gain + 1
        ang, dt = changes
        small = ((ang < 0.4 * self.step or ang <= 1.03 * self.min_changes[0])
                 and (dt < 0.4 * s.shift_step(self.step) or dt <= 1.03 * self.min_changes[1]))
        self.min_changes = (min(self.min_changes[0], ang), min(self.min_changes[1], dt))
        r_res = _shell(s, self.resolution)
        incr = s.incr_shells
        edge = self.fsc["corrected"][min(self.r, s.D // 2 - 1)]
        if edge > 0.2 and float(self.pmax.mean()) > 0.1:
            incr = max(incr, s.D // 8)
        self.r = int(np.clip(r_res + incr, s.r_init, s.r_max))
        self.order = max(self.order, s.order_for(self.r))
        if self.n_wo_gain >= 1 and small and s.temperature(t) == 1.0:
            if self.step <= s.min_step_deg or self.step <= pose_sd:
                self.converged = True
            else:
                self.order += 1
                self.n_wo_gain = 0
                self.min_changes = (math.inf, math.inf)

    # ------------------------------------------------------------------ outputs

    def result(self) -> Result:
        """Maps and curves of the last pass (call after the final pass)."""
        s, xp = self.s, self.xp
        raw = [wiener(a) for a in self.accs]
        full_acc = self.full_accumulator()
        full = wiener(full_acc, tau2_from_fsc(xp.asarray(self.fsc["corrected"]), full_acc, full=True))
        fit = None
        if math.isfinite(self.resolution):
            try:
                fit = guinier_fit(0.5 * (raw[0] + raw[1]), s.pixel_size, self.resolution, mask=self.mask)
            except ValueError:
                fit = None
        sharp = full if fit is None else sharpen(full, fit.bfactor, s.pixel_size, self.resolution)
        return Result(raw[0], raw[1], full, sharp, self.mask, dict(self.fsc), self.resolution, fit)

    def state(self) -> dict[str, np.ndarray]:
        """Checkpoint (host arrays)."""
        sched = [self.r, self.order, self.best_res, self.n_wo_gain, *self.min_changes, self.converged,
                 self.has_poses, self.resolution, self.greyscale, self.dynamic, self.researched]
        return {"vols": to_host(self.vols), "mask": to_host(self.mask), "sigma2": to_host(self.sigma2),
                "sigma2_0": to_host(self.sigma2_0), "R": self.R, "shifts": self.shifts, "alpha": self.alpha,
                "pmax": self.pmax, "half": self.half, "fsc": np.stack([self.fsc[k] for k in FSC_KINDS]),
                "schedule": np.asarray(sched, dtype=np.float64),
                "acc_data": np.stack([to_host(a.data) for a in self.accs]),
                "acc_weight": np.stack([to_host(a.weight) for a in self.accs])}

    def load_state(self, d: dict[str, np.ndarray]) -> None:
        """Restore a ``state()`` checkpoint."""
        xp = self.xp
        self.vols, self.mask = xp.asarray(d["vols"]), xp.asarray(d["mask"])
        self.sigma2, self.sigma2_0 = xp.asarray(d["sigma2"]), xp.asarray(d["sigma2_0"])
        self.R, self.shifts, self.alpha, self.pmax = d["R"], d["shifts"], d["alpha"], d["pmax"]
        self.half = d["half"].astype(np.int64)
        self.fsc = {k: d["fsc"][i] for i, k in enumerate(FSC_KINDS)}
        r, order, best, nwo, c0, c1, conv, has, res, grey, dyn, rs = d["schedule"].tolist()
        self.r, self.order, self.best_res, self.n_wo_gain = int(r), int(order), best, int(nwo)
        self.min_changes, self.converged, self.has_poses = (c0, c1), bool(conv), bool(has)
        self.resolution, self.greyscale, self.dynamic, self.researched = res, grey, bool(dyn), bool(rs)
        for a, data, weight in zip(self.accs, d["acc_data"], d["acc_weight"], strict=True):
            a.data, a.weight = xp.asarray(data), xp.asarray(weight)


def _shell(s: Settings, res_A: float) -> int:
    """Last whole shell inside a resolution (Å); 0 for inf."""
    return int(math.floor(s.D * s.pixel_size / res_A + 1e-9)) if math.isfinite(res_A) else 0


def _posterior_stats(res: SearchResult) -> tuple[np.ndarray, np.ndarray]:
    """Max posterior (B,) of the pose set and its angular s.d. (B,) deg about the best pose:
    sqrt(sum gamma angle(R_s, R_best)^2) over the significant hypotheses."""
    poses = res.poses
    lse = to_host(poses.lse)[:, 0]
    pmax = np.exp(to_host(poses.logits)[:, 0, 0].astype(np.float64) - lse)
    gamma = to_host(pose_weights(poses))[:, 0]
    d = to_host(angular_distance_deg(poses.R[:, 0], res.R[:, :1]))
    return pmax, np.sqrt((gamma * d * d).sum(axis=1))
