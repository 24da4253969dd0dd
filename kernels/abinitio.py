"""Ab-initio reconstruction of K classes by preconditioned stochastic gradient descent with
resolution annealing (algorithms.md §5; Punjani et al. 2017).

Iteration t works at band radius r_t (shells of the working box): r_init for the first
``n_init_iters``, then + ``radius_step`` per iteration up to r_max, then ``n_final_iters`` at
r_max. On a random minibatch of B of the N particles:

  E-step   coarse-to-fine pose search per class with marginalisation over the pruned pose set
           (kernels/refine3d.py) at temperature c_t^2 (c_t: ``sigma_scale`` annealed to 1 over
           the first n_init_iters + anneal iterations, the §1.6 shape); class posteriors mixed
           with the uniform distribution by the class similarity beta_t (beta until
           ``similarity_end`` / 2, then linearly to 0 at ``similarity_end``).
  gradient the MAP objective's gradient with the diagonal preconditioner H = (N/B) W + 1/tau2
           (W the CTF^2/sigma2 weights back-projected with the data B) is
           g / H = V_B - V, with V_B = (N/B) B / ((N/B) W + 1/tau2) = ``wiener(acc, tau2, T=N/B)``
           the minibatch's MAP estimate. Update Delta <- mu Delta + eta_t (V_B - V); V <- V + Delta.
           tau2 = 2 x the map's own power (``refine3d.model_tau2``).
  project  onto the constraints: re-centre (one shift for all classes: the pi-weighted centre of
           mass), non-negativity, soft spherical window, zero above r_t.
  priors   pi <- (1 - eta) pi + eta mean_i p_i; the noise model by shrinkage (§1.6) of the
           residual power at each particle's best pose of its best class, summed over the
           minibatches with decay ``noise_decay`` per iteration (a window of ~10 batches at
           0.9), so the initial estimate sigma2_0, which holds the signal power too, keeps the
           weight of 50 images against all of them. With one batch per update (as before) it
           kept 50 / (50 + B) = 25% at B = 150: at the end of a 3-class run on three distinct
           structures (started from their true maps at 48 Å) the noise at shells 1-3 was still
           3.2 / 2.7 / 2.1 x the true noise, so the low shells, where the classes differ most,
           were down-weighted; with the decayed sums the final ARI of that run rose from 0.66
           to 0.77 (bench/RESULTS.md, session 19).

Several classes separate slowly, at the full band: on two different structures (D 24, 2 x 300)
K = 2 with 30 + 8 + 30 iterations reached ARI 0.88 / 0.19 / 0.75 / 0.72 / 0.59 for five seeds
(0.06 for the first with 10 + 8 + 10), and three structures, two of them alike, did not separate
(ARI 0.17-0.30; bench/RESULTS.md, session 19).

With a point group (``symmetry``, Cn or Dn) every minibatch accumulator is symmetrised
before the update. Classes whose prior falls below 0.2 / K after the similarity phase are re-seeded from the
largest class plus low-passed noise (§5.3 [I]). The initial maps are non-negative low-passed
random densities inside the window, scaled so that their CTF-modulated projections carry half
the data power below r_init. Memory: K maps, their momentum, one minibatch.

Several starts [I] (``n_starts`` > 1, ``best_start``): the initial phase (the n_init_iters
iterations at r_init, on the same minibatches) runs from each of n_starts random starts, and the
run continues from the start whose maps give a separate batch the highest mean log evidence
log sum_k pi_k p(X | V_k) (poses marginalised, the initial noise model, temperature 1) on the
r_init band. SGD from a random start converges to a wrong structure for some starts, and that is
decided early: on a demo dataset (6 domains, 1-class schedule of the standard pipeline, 2,000
particles) 2 of 5 single runs (seeds 0-4) ended at corr 0.47-0.50 with the truth, 3 at 0.87-0.88;
after the initial phase the log evidence (each run on its own batch) was -27.1 / -27.5 for the
two and -26.6 / -26.5 / -25.9 for the three. The first checkpoint follows the starts. The
evidence is not always that decisive: on another realization of the demo (seed 2) six single runs
ended at corr 0.54-0.85 in an order the initial-phase evidence did not predict, and 3 starts
chose one that ended at 0.630 where the first alone reached 0.768 (bench/RESULTS.md, session 18).

``start_choice="final"`` (``best_final``) runs every start through the whole schedule instead and
keeps the one whose final maps give a separate batch the highest mean log evidence at the final
band under one noise model (the mean of the starts' final sigma2), so that no start is favoured
by its own noise estimate. It costs n_starts whole runs. On 2 classes of two structures
(5 engine seeds x 3 starts, 30 + 8 + 30) it kept the start of highest ARI in 4 of 5 seeds and
one 0.006 below the highest in the fifth (kept ARIs 0.883, 0.804, 0.751, 0.792, 0.639; the first
start alone 0.883, 0.186, 0.751, 0.722, 0.587); on the seed-2 demo (1 class, 3 starts) it kept
0.721 of 0.754 / 0.721 / 0.628 with one job seed and 0.755 of 0.516 / 0.754 / 0.755 with another
(bench/RESULTS.md, session 20).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from scipy.special import logsumexp

from kernels.backend import to_host
from kernels.fourier import Band, lowpass
from kernels.projection import prepare_volume, project
from kernels.reconstruction import Accumulator3D, wiener
from kernels.refine3d import (
    EStep3D,
    centre_of_mass,
    constrain,
    expectation,
    initial_noise,
    insert,
    model_tau2,
    pixel_power,
    plan_for,
    residual_power,
    shell_pixels,
    shift_volume,
    shrink_noise,
)
from kernels.rotations import random_rotations
from kernels.symmetry import point_group

Loader = Callable[[np.ndarray, Band], tuple[Any, Any]]


@dataclass(frozen=True)
class Settings:
    """Schedule and options (shells and px of the working box D; pixel_size Å/px at D)."""

    n_classes: int
    D: int
    pixel_size: float
    r_init: float
    r_max: float
    n_init_iters: int = 30
    radius_step: float = 0.25
    n_final_iters: int = 30
    batch_size: int = 200
    learning_rate: float = 0.4
    learning_rate_final: float = 0.15
    high_lr_iters: int = 30
    momentum: float = 0.0
    class_similarity: float = 0.1
    similarity_end: int = 40
    sigma_scale: float = 2.0
    nonneg: bool = True
    recentre: bool = True
    window_radius_px: float | None = None
    shift_extent_px: float = 3.0
    max_order: int = 4
    symmetry: str = "C1"
    n_starts: int = 1
    start_choice: str = "initial"
    noise_decay: float = 0.9

    def __post_init__(self) -> None:
        if self.start_choice not in ("initial", "final"):
            raise ValueError(f"start_choice {self.start_choice!r} is not 'initial' or 'final'")
        if self.n_starts < 1 or (self.n_starts > 1 and self.start_choice == "initial" and self.n_init_iters < 1):
            raise ValueError(f"n_starts {self.n_starts} needs n_starts >= 1 and, above 1 with the initial choice, "
                             f"initial iterations to compare (n_init_iters {self.n_init_iters})")

    @property
    def n_anneal_iters(self) -> int:
        return max(0, math.ceil((self.r_max - self.r_init) / self.radius_step))

    @property
    def n_iterations(self) -> int:
        return self.n_init_iters + self.n_anneal_iters + self.n_final_iters

    def radius(self, t: int) -> float:
        """Band radius r_t (shells) of iteration t (0-based)."""
        return min(self.r_init + self.radius_step * max(0, t - self.n_init_iters + 1), self.r_max)

    def eta(self, t: int) -> float:
        return self.learning_rate if t < self.high_lr_iters else self.learning_rate_final

    def beta(self, t: int) -> float:
        half = self.similarity_end / 2
        if t < half:
            return self.class_similarity
        return max(0.0, self.class_similarity * (1 - (t - half) / max(half, 1)))

    def temperature(self, t: int) -> float:
        """c_t^2: sigma_scale^2 decaying geometrically to 1 at the end of the annealing."""
        n = self.n_init_iters + self.n_anneal_iters
        return float(self.sigma_scale ** (2 * max(0.0, 1 - t / max(n, 1))))

    def window(self) -> float:
        """Radius (px) of the soft spherical window (3 px raised-cosine edge beyond it): 0.85 x
        the box radius unless given. The window is applied every iteration, so it must clear
        the particle: D/2 - 4 px (the old default) cut into the periphery of a particle of 0.72
        box diameter at D = 24 and, from the true maps of the 3-state test set with the maps
        frozen, took the batch class ARI from 0.86 to 0.23 in 8 iterations (a 10 px window, ~0.85 x D/2:
        0.71-0.88)."""
        return 0.85 * self.D / 2 if self.window_radius_px is None else self.window_radius_px


class AbInitio:
    """State of an ab-initio run: maps ``vols`` (K, D, D, D) float32, momentum, pi (K,), noise
    sigma2 (D//2,). Minibatch t is a sorted random draw (seeded by [seed, t]) from the N
    particles, so a resumed run continues with the same batches."""

    def __init__(self, settings: Settings, xp: ModuleType, n_particles: int, seed: int) -> None:
        s = settings
        self.s, self.xp, self.N, self.seed = s, xp, n_particles, seed
        K, D = s.n_classes, s.D
        self.vols = xp.zeros((K, D, D, D), dtype=xp.float32)
        self.delta = xp.zeros_like(self.vols)
        self.pi = np.full(K, 1.0 / K)
        self.sigma2 = xp.ones(D // 2)
        self.sigma2_0 = xp.ones(D // 2)
        self.noise_power = xp.zeros(D // 2)
        self.noise_images = xp.zeros(D // 2)
        self.ops = point_group(s.symmetry)

    def batch_indices(self, t: int) -> np.ndarray:
        B = min(self.s.batch_size, self.N)
        return np.sort(np.random.default_rng([self.seed, t]).choice(self.N, B, replace=False))

    def initialise(self, load: Loader, start: int = 0) -> None:
        """Noise model from a batch on the full band and start ``start``'s random initial maps
        (module doc); resets the momentum, class priors and noise sums, so every start begins
        from the same state but its maps."""
        s, xp = self.s, self.xp
        band = Band(s.D, s.r_max)
        X, C = load(self.batch_indices(1 << 30), band)
        self.delta = xp.zeros_like(self.vols)
        self.pi = np.full(s.n_classes, 1.0 / s.n_classes)
        self.noise_power, self.noise_images = xp.zeros(s.D // 2), xp.zeros(s.D // 2)
        self.sigma2_0 = initial_noise(X, band, s.D)
        self.sigma2 = self.sigma2_0.copy()
        rng = np.random.default_rng([self.seed, 1 << 20] + ([start] if start else []))
        low = Band(s.D, s.r_init)
        cols = np.searchsorted(band.idx, low.idx)
        Xl, Cl = X[:, xp.asarray(cols)], C[:, xp.asarray(cols)]
        self._random_maps(rng, Xl, Cl, low)

    def _random_maps(self, rng: np.random.Generator, Xl: Any, Cl: Any, low: Band) -> None:
        """Random initial maps scaled so that their projections carry half the power of the
        batch Xl, Cl on the band ``low`` (module doc)."""
        s, xp = self.s, self.xp
        data_power = float(xp.mean(xp.abs(Xl) ** 2))
        for k in range(s.n_classes):
            v = xp.asarray(rng.normal(size=(s.D,) * 3).astype(np.float32))
            v = constrain(lowpass(v, min(7.0, s.r_init), 1.0), s.window(), True, False)
            P = project(prepare_volume(v), xp.asarray(random_rotations(Xl.shape[0], rng)), low)
            model_power = float(xp.mean(xp.abs(Cl * P) ** 2))
            self.vols[k] = v * np.float32(math.sqrt(0.5 * data_power / max(model_power, 1e-30)))

    def best_start(self, load: Loader,
                   progress: Callable[[int, float], None] | None = None) -> tuple[int, list[dict[str, Any]]]:
        """Runs the initial phase (iterations 0 .. n_init_iters - 1) from ``n_starts`` random starts
        (``initialise(load, m)``) on the same minibatches and keeps the start whose maps give a
        separate batch the highest mean log evidence on the band r_init (module doc). Call after
        ``initialise``; returns the last iteration done and the chosen start's ``iterate``
        metrics per iteration. progress(start, score) after each start."""
        s = self.s
        low = Band(s.D, int(math.floor(s.r_init)))
        X, C = load(self.batch_indices(1 << 29), low)
        best, best_state, best_metrics = -math.inf, self.state(), []
        for m in range(s.n_starts):
            if m > 0:
                self.initialise(load, m)
            metrics = [self.iterate(t, load)[2] for t in range(s.n_init_iters)]
            score = self.log_evidence(X, C, low)
            if not math.isfinite(score):
                raise ValueError(f"start {m + 1}: the log evidence is not finite ({score})")
            if progress is not None:
                progress(m, score)
            if score > best:
                best, best_metrics = score, metrics
                best_state = {k: v.copy() for k, v in self.state().items()}
        self.load_state(best_state)
        return s.n_init_iters - 1, best_metrics

    def best_final(self, finals: list[dict[str, np.ndarray]], load: Loader) -> tuple[int, list[float]]:
        """Loads, of the final states ``finals`` of whole runs from several starts, the one whose
        maps give a separate batch the highest mean log evidence on the full band under one noise
        model for all: the mean of their final sigma2 (module doc). Returns its index and the
        scores."""
        band = Band(self.s.D, int(math.floor(self.s.r_max)))
        X, C = load(self.batch_indices(1 << 29), band)
        common = self.xp.mean(self.xp.stack([self.xp.asarray(f["sigma2"]) for f in finals]), axis=0)
        scores = []
        for m, final in enumerate(finals):
            self.load_state(final)
            scores.append(self.log_evidence(X, C, band, common))
            if not math.isfinite(scores[-1]):
                raise ValueError(f"start {m + 1}: the log evidence is not finite ({scores[-1]})")
        best = int(np.argmax(scores))
        self.load_state(finals[best])
        return best, scores

    def log_evidence(self, X: Any, C: Any, band: Band, sigma2: Any = None) -> float:
        """Mean over the particles X, C of log sum_k pi_k p(X | V_k) (poses marginalised, the
        noise model ``sigma2``, by default the initial sigma2_0, temperature 1) on ``band``."""
        vfts = [prepare_volume(v) for v in self.vols]
        log_pi = np.log(np.maximum(self.pi, 1e-300))
        e = expectation(X, C, self.sigma2_0 if sigma2 is None else sigma2, band, vfts, log_pi,
                        plan_for(band.r_max, self.s.shift_extent_px, self.s.max_order), 1.0)
        return float(np.mean(logsumexp(e.lse + log_pi[None], axis=1)))

    def iterate(self, t: int, load: Loader) -> tuple[np.ndarray, EStep3D, dict[str, Any]]:
        """One SGD iteration; returns (batch indices, its E-step, metrics)."""
        s, xp, K = self.s, self.xp, self.s.n_classes
        r = s.radius(t)
        band = Band(s.D, int(math.floor(r)))
        idx = self.batch_indices(t)
        X, C = load(idx, band)
        vfts = [prepare_volume(v) for v in self.vols]
        temp = s.temperature(t)
        e = expectation(X, C, self.sigma2, band, vfts, np.log(np.maximum(self.pi, 1e-300)),
                        plan_for(r, s.shift_extent_px, s.max_order), temp)
        beta = s.beta(t)
        p = (1 - beta) * e.p + beta / K
        accs = [Accumulator3D(s.D, 2, xp) for _ in range(K)]
        insert(accs, X, C, e, band, self.sigma2, p)
        if len(self.ops) > 1:
            for a in accs:
                a.symmetrize(self.ops)
        eta, scale = s.eta(t), self.N / idx.size
        for k in range(K):
            target = wiener(accs[k], model_tau2(self.vols[k], band.r_max), T=scale)
            self.delta[k] = s.momentum * self.delta[k] + eta * (target - self.vols[k])
        moved = self.vols + self.delta
        if s.recentre:
            centre = self._common_centre(moved)
            moved = xp.stack([shift_volume(v, -centre) for v in moved])
        for k in range(K):
            self.vols[k] = lowpass(constrain(moved[k], s.window(), s.nonneg, False), band.r_max, 1.0)
        self.pi = (1 - eta) * self.pi + eta * p.mean(axis=0)
        best = p.argmax(axis=1)
        self._update_noise(residual_power(X, C, band, vfts, e, best), band, idx.size)
        if K > 1 and t >= s.similarity_end:
            self._reseed(t)
        metrics = {"resolution_A": s.D * s.pixel_size / band.r_max, "temperature": temp,
                   "class_similarity": beta, "class_fractions": [round(float(x), 4) for x in self.pi],
                   "mean_class_ess": float(e.class_ess.mean())}
        return idx, e, metrics

    def _update_noise(self, resid: Any, band: Band, n_images: int) -> None:
        """Decayed sums of the residual power and image count per shell, and sigma2 by
        shrinkage of their ratio on the band's shells with pixels (module doc)."""
        xp, n = self.xp, min(self.s.D // 2, band.n_shells)
        has = shell_pixels(band, xp)[:n] > 0
        power, images = self.noise_power * self.s.noise_decay, self.noise_images * self.s.noise_decay
        power[:n] += pixel_power(resid, band)[:n]
        images[:n] += xp.where(has, n_images, 0)
        sigma2 = xp.asarray(self.sigma2, dtype=xp.float64).copy()
        sigma2[:n] = xp.where(has, shrink_noise(self.sigma2_0[:n], power[:n], images[:n]), sigma2[:n])
        self.noise_power, self.noise_images, self.sigma2 = power, images, sigma2

    def _common_centre(self, vols: Any) -> Any:
        """Centre of mass (3,) px of the class maps weighted by pi: one shift for all classes
        keeps them in the particles' common frame (each map moved to its own centre would put
        states that lack or move a domain off-centre: measured on two sub-complexes whose
        centres differ by 4.5 px, K = 2 ended in one class (ARI 0.02) with per-class centring
        and separated them (ARI 0.72) without it)."""
        w = self.pi / self.pi.sum()
        return sum(float(w[k]) * centre_of_mass(v) for k, v in enumerate(vols))

    def _reseed(self, t: int) -> None:
        """Re-seed classes with pi < 0.2 / K from the largest class plus low-passed noise."""
        s, xp = self.s, self.xp
        dead = np.flatnonzero(self.pi < 0.2 / s.n_classes)
        if dead.size == 0:
            return
        j = int(self.pi.argmax())
        rng = np.random.default_rng([self.seed, 2 << 20, t])
        sd = float(xp.std(self.vols[j]))
        for k in dead:
            noise = xp.asarray(rng.normal(0, sd, (s.D,) * 3).astype(np.float32))
            self.vols[k] = self.vols[j] + lowpass(noise, 4.0, 1.0)
            self.delta[k] = 0
            self.pi[k] = self.pi[j] = self.pi[j] / 2

    def assign(self, X: Any, C: Any, band: Band) -> EStep3D:
        """Final E-step (temperature 1, no similarity) of particles on ``band``."""
        vfts = [prepare_volume(v) for v in self.vols]
        return expectation(X, C, self.sigma2, band, vfts, np.log(np.maximum(self.pi, 1e-300)),
                           plan_for(band.r_max, self.s.shift_extent_px, self.s.max_order), 1.0)

    def state(self) -> dict[str, np.ndarray]:
        return {"vols": to_host(self.vols), "delta": to_host(self.delta), "pi": self.pi,
                "sigma2": to_host(self.sigma2), "sigma2_0": to_host(self.sigma2_0),
                "noise_power": to_host(self.noise_power), "noise_images": to_host(self.noise_images)}

    def load_state(self, d: dict[str, np.ndarray]) -> None:
        xp = self.xp
        self.vols, self.delta = xp.asarray(d["vols"]), xp.asarray(d["delta"])
        self.pi = np.asarray(d["pi"], dtype=np.float64)
        self.sigma2, self.sigma2_0 = xp.asarray(d["sigma2"]), xp.asarray(d["sigma2_0"])
        empty = np.zeros(self.s.D // 2)  # a checkpoint from before the decayed noise sums
        self.noise_power = xp.asarray(d.get("noise_power", empty))
        self.noise_images = xp.asarray(d.get("noise_images", empty))
