"""Heterogeneous refinement: K-class 3D refinement with global pose search, online EM with
half-map decay, then full EM passes (algorithms.md §7).

Each iteration works on the band r_t = clip(ceil(bp_factor x r_res), r_init, r_max) shells,
r_res the shell of the best class resolution (FSC 0.143 of its half maps): the E-step aligns
and the M-step back-projects only up to 1.5x the best class resolution (cryoSPARC
"backprojection resolution factor"). r_t = r_init during the random-assignment iterations and
grows by at most one shell per iteration: maps of random subsets agree to high resolution
(their FSC says nothing about the classes), and classes that first separate on the band where
the states differ most do not split by view instead (measured from three copies of the
consensus, D = 24, 600 particles: batch ARI 0.2 when the band jumped from 5 to 8 shells at
once, 0.5 at 5 shells).

  start     the K maps low-passed to r_init, each brought to the data's greyscale on the
            r_init band (``greyscale``; kernels/greyscale.py, one class searched at a time).

O-EM iteration t on a random batch of ``batch_per_class`` x K particles:

  E-step    global coarse-to-fine pose search per class, marginal class posteriors at
            temperature c_t^2 (c: ``sigma_scale`` -> 1 over the random and first O-EM
            iterations); during the first ``n_random_iters`` the class of each particle is
            drawn uniformly at random instead (breaks the symmetry of identical starts), with
            the poses still searched per class; ``force_hard`` uses the argmax class.
  M-step    per class and half (particle index parity) the decayed accumulators
            S <- decay x S + S_batch (cryoSPARC "halfmap decay", a sliding window of
            ~1/(1-decay) batches); per-class FSC of the half maps; one signal prior for all
            classes: tau2 from the MAX FSC over classes (so a small class's noisy FSC does not
            over-filter it) per unit weight of the LARGEST class, so each class is shrunk by
            how much data it holds (a class of a few pure-noise images shrinks to ~0 and so
            attracts noise; with the max FSC applied per class's own weight its map stayed
            a loud noise average and the noise images went to the particle classes: §7.3 E3,
            4% -> 100% of them in the junk class); the Wiener map of both halves W_k is blended
            V_k <- (1 - eta) V_k + eta W_k with eta = lr_random during randomisation, then
            lr_init x 0.5^(t / lr_half_life).
  priors    pi <- (1 - eta) pi + eta mean p; noise by shrinkage of best-pose residuals.
  converged when, after randomisation, < ``switch_tol`` of the batch changed class since it
            was last seen and the band moved by <= 1 shell.

With a point group (``symmetry``) the accumulators are symmetrised before use. Full passes:
every particle once (streamed), fresh accumulators, eta = 1. Memory: 2 K padded
accumulators, K maps, one batch; per particle only the last class (int).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import to_host
from kernels.fourier import Band, lowpass
from kernels.fsc import fsc, resolution_at
from kernels.greyscale import match_greyscale
from kernels.projection import prepare_volume
from kernels.reconstruction import Accumulator3D, tau2_from_fsc, wiener
from kernels.refine3d import (
    EStep3D,
    expectation,
    initial_noise,
    insert,
    plan_for,
    residual_power,
    update_noise,
)
from kernels.symmetry import point_group

Loader = Callable[[np.ndarray, Band], tuple[Any, Any]]


@dataclass(frozen=True)
class Settings:
    """Options (shells/px of the working box D, pixel_size Å/px)."""

    n_classes: int
    D: int
    pixel_size: float
    r_max: int
    r_init: int
    batch_per_class: int = 1000
    n_random_iters: int = 5
    max_oem_iters: int = 40
    lr_random: float = 0.2
    lr_init: float = 0.1
    lr_half_life: float = 50.0
    halfmap_decay: float = 0.9
    bp_factor: float = 1.5
    switch_tol: float = 0.05
    n_full_iters: int = 2
    force_hard: bool = False
    sigma_scale: float = 3.0
    shift_extent_px: float = 3.0
    max_order: int = 4
    symmetry: str = "C1"
    greyscale: bool = True

    def eta(self, t: int) -> float:
        if t < self.n_random_iters:
            return self.lr_random
        return self.lr_init * 0.5 ** ((t - self.n_random_iters) / self.lr_half_life)

    def temperature(self, t: int) -> float:
        n = 2 * self.n_random_iters
        return float(self.sigma_scale ** (2 * max(0.0, 1 - t / max(n, 1))))


@dataclass
class Assignment:
    """Per particle (host): class (B,), posteriors p (B, K), class ESS, R (B, 3, 3) and shift
    (B, 2) px in the assigned class, pose ESS-free log evidence lse (B, K)."""

    cls: np.ndarray
    p: np.ndarray
    class_ess: np.ndarray
    R: np.ndarray
    shift: np.ndarray
    lse: np.ndarray


def _assignment(e: EStep3D, p: np.ndarray) -> Assignment:
    cls = p.argmax(axis=1)
    b = np.arange(cls.size)
    return Assignment(cls, p, 1.0 / (p * p).sum(axis=1), to_host(e.result.R)[b, cls],
                      to_host(e.result.shifts)[b, cls], e.lse)


class HeteroRefine:
    """State: maps ``vols`` (K, D, D, D), decayed half accumulators ``acc[h][k]``, pi, sigma2,
    per-class FSC and resolution (Å), last class of each particle (-1 = not seen)."""

    def __init__(self, settings: Settings, xp: ModuleType, n_particles: int, seed: int) -> None:
        s = settings
        self.s, self.xp, self.N, self.seed = s, xp, n_particles, seed
        K, D = s.n_classes, s.D
        self.vols = xp.zeros((K, D, D, D), dtype=xp.float32)
        self.acc = [[Accumulator3D(D, 2, xp) for _ in range(K)] for _ in range(2)]
        self.pi = np.full(K, 1.0 / K)
        self.sigma2 = xp.ones(D // 2)
        self.sigma2_0 = xp.ones(D // 2)
        self.fsc = np.zeros((K, D // 2))
        self.resolution = np.full(K, np.inf)
        self.last = np.full(n_particles, -1, dtype=np.int64)
        self.r = s.r_init
        self.ops = point_group(s.symmetry)
        self.greyscale = np.ones(K)

    def initialise(self, volumes: Any, load: Loader) -> None:
        """Start maps (K, D, D, D) low-passed to r_init; noise model from a random batch of
        <= 1,000 particles; with ``greyscale`` each map brought to the data's scale on the r_init
        band (kernels/greyscale.py, searches as the E-step's): maps from different jobs or
        programs carry different scales, and the class likelihoods are not scale-free."""
        s, xp = self.s, self.xp
        self.vols = xp.stack([lowpass(xp.asarray(v, dtype=xp.float32), s.r_init, 2.0) for v in volumes])
        band = Band(s.D, s.r_max)
        idx = np.sort(np.random.default_rng([self.seed, 1 << 20]).choice(self.N, min(self.N, 1000), replace=False))
        X, _ = load(idx, band)
        self.sigma2_0 = initial_noise(X, band, s.D)
        self.sigma2 = self.sigma2_0.copy()
        if s.greyscale:
            band = Band(s.D, s.r_init)
            X, C = load(idx, band)
            plan = plan_for(band.r_max, s.shift_extent_px, s.max_order)
            rng = np.random.default_rng([self.seed, 1 << 21])

            def search(vft: Any) -> Any:
                return expectation(X, C, self.sigma2, band, [vft], np.zeros(1), plan).result

            self.greyscale = np.array([match_greyscale(X, C, band, v, None, self.sigma2, search, rng)[0]
                                       for v in self.vols])
            self.vols = self.vols * xp.asarray(self.greyscale, dtype=xp.float32)[:, None, None, None]

    def batch_indices(self, t: int) -> np.ndarray:
        B = min(self.s.batch_per_class * self.s.n_classes, self.N)
        return np.sort(np.random.default_rng([self.seed, t]).choice(self.N, B, replace=False))

    def _band_radius(self, t: int) -> int:
        s = self.s
        alive = np.isfinite(self.resolution)
        if t < s.n_random_iters or not alive.any():
            return s.r_init
        r_res = s.D * s.pixel_size / float(self.resolution[alive].min())
        return int(np.clip(math.ceil(s.bp_factor * r_res), s.r_init, min(s.r_max, self.r + 1)))

    def _estep(self, X: Any, C: Any, band: Band, temperature: float) -> EStep3D:
        vfts = [prepare_volume(v) for v in self.vols]
        return expectation(X, C, self.sigma2, band, vfts, np.log(np.maximum(self.pi, 1e-300)),
                           plan_for(band.r_max, self.s.shift_extent_px, self.s.max_order), temperature)

    def _weights(self, e: EStep3D, random_labels: np.ndarray | None) -> np.ndarray:
        K = self.s.n_classes
        if random_labels is not None:
            return np.eye(K)[random_labels]
        if self.s.force_hard:
            return np.eye(K)[e.p.argmax(axis=1)]
        return e.p

    def _accumulate(self, accs: list[list[Accumulator3D]], X: Any, C: Any, e: EStep3D, band: Band,
                    p: np.ndarray, idx: np.ndarray) -> None:
        for h in (0, 1):
            rows = np.flatnonzero(idx % 2 == h)
            if rows.size:
                insert(accs[h], X, C, e, band, self.sigma2, p, rows=rows)

    def _symmetrise(self, accs: list[list[Accumulator3D]]) -> None:
        if len(self.ops) > 1:
            for row in accs:
                for a in row:
                    a.symmetrize(self.ops)

    def _maximise(self, eta: float) -> None:
        """Per-class FSC, one signal prior (max FSC, largest class), blended Wiener maps (module doc)."""
        s, xp, K = self.s, self.xp, self.s.n_classes
        curves = []
        for k in range(K):
            raw = [wiener(self.acc[h][k]) for h in (0, 1)]
            curves.append(to_host(fsc(raw[0], raw[1])))
        self.fsc = np.stack(curves)
        self.fsc[:, self.r + 1 :] = 0.0  # nothing was back-projected beyond the band
        best = self.fsc.max(axis=0)
        fulls = []
        for k in range(K):
            full = Accumulator3D(s.D, 2, xp)
            full.add(self.acc[0][k])
            full.add(self.acc[1][k])
            fulls.append(full)
        largest = int(np.argmax([float(xp.sum(f.weight)) for f in fulls]))
        tau2 = tau2_from_fsc(xp.asarray(best), fulls[largest], full=True)
        for k in range(K):
            self.vols[k] = (1 - eta) * self.vols[k] + eta * wiener(fulls[k], tau2)
        self.resolution = np.array([resolution_at(f, 0.143, s.D, s.pixel_size) for f in self.fsc])

    def oem_iteration(self, t: int, load: Loader) -> tuple[np.ndarray, Assignment, dict[str, Any]]:
        """One O-EM iteration; returns (batch indices, assignment, metrics incl. 'switched')."""
        s, xp, K = self.s, self.xp, self.s.n_classes
        r_prev = self.r
        self.r = self._band_radius(t)
        band = Band(s.D, self.r)
        idx = self.batch_indices(t)
        X, C = load(idx, band)
        e = self._estep(X, C, band, s.temperature(t))
        labels = None
        if t < s.n_random_iters:
            labels = np.random.default_rng([self.seed, 2 << 20, t]).integers(0, K, idx.size)
        p = self._weights(e, labels)
        batch = [[Accumulator3D(s.D, 2, xp) for _ in range(K)] for _ in range(2)]
        self._accumulate(batch, X, C, e, band, p, idx)
        self._symmetrise(batch)
        for h in (0, 1):
            for k in range(K):
                a = self.acc[h][k]
                a.data *= s.halfmap_decay
                a.weight *= s.halfmap_decay
                a.add(batch[h][k])
        eta = s.eta(t)
        self._maximise(eta)
        self.pi = (1 - eta) * self.pi + eta * p.mean(axis=0)
        out = _assignment(e, e.p)
        vfts = [prepare_volume(v) for v in self.vols]
        self.sigma2 = update_noise(self.sigma2, self.sigma2_0,
                                   residual_power(X, C, band, vfts, e, out.cls), band, idx.size)
        seen = self.last[idx] >= 0
        switched = float(np.mean(self.last[idx][seen] != out.cls[seen])) if seen.any() else 1.0
        self.last[idx] = out.cls
        metrics = {"band_shells": self.r, "resolution_A": [round(float(x), 2) for x in self.resolution],
                   "class_fractions": [round(float(x), 4) for x in self.pi], "switched": switched,
                   "mean_class_ess": float(out.class_ess.mean()), "band_moved": abs(self.r - r_prev)}
        return idx, out, metrics

    def converged(self, t: int, metrics: dict[str, Any]) -> bool:
        return (t >= self.s.n_random_iters + 1 and metrics["switched"] < self.s.switch_tol
                and metrics["band_moved"] <= 1)

    def full_iteration(self, batches: Iterable[tuple[np.ndarray, Any, Any]], band: Band) -> Assignment:
        """A full EM pass (eta = 1) over (indices, X, C) batches on ``band``; returns the
        particles' assignment (in batch order)."""
        s, xp, K = self.s, self.xp, self.s.n_classes
        accs = [[Accumulator3D(s.D, 2, xp) for _ in range(K)] for _ in range(2)]
        parts: list[Assignment] = []
        mass = np.zeros(K)
        for idx, X, C in batches:
            e = self._estep(X, C, band, 1.0)
            p = self._weights(e, None)
            self._accumulate(accs, X, C, e, band, p, np.asarray(idx))
            mass += p.sum(axis=0)
            parts.append(_assignment(e, e.p))
        self._symmetrise(accs)
        self.acc = accs
        self._maximise(1.0)
        self.pi = mass / max(mass.sum(), 1e-300)
        return Assignment(*(np.concatenate([getattr(a, f) for a in parts])
                            for f in Assignment.__dataclass_fields__))

    def half_maps(self, k: int) -> tuple[Any, Any]:
        """Regularised half maps of class k (each with tau2 from its own class FSC)."""
        out = []
        for h in (0, 1):
            a = self.acc[h][k]
            out.append(wiener(a, tau2_from_fsc(self.xp.asarray(self.fsc[k]), a)))
        return out[0], out[1]
