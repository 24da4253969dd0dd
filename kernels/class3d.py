"""3D classification without alignment (algorithms.md §8; cryoSPARC "3D Classification",
RELION ``--skip_align``).

Poses (R_i, t_i) are fixed inputs (t in px moves the particle content by +t). For particle i
and class k, on the band r_hp < r <= r_max (whole shells, DC excluded):

  diff2_ik = 0.5 sum_f w_f |X_i(f) e^{+2 pi i f.t_i/D} - alpha_i C_i(f) (P_{R_i} V_k)(f)|^2 / sigma2(r(f))
  p_ik     = softmax_k(-diff2_ik + log pi_k), mixed with the uniform distribution by the class
             similarity beta_t (beta0 annealed linearly to 0 at iteration ``similarity_end``;
             beta0 optionally tuned on the first batch so that the mean class ESS is
             ``target_ess_fraction`` x K), one-hot if ``force_hard``.

M-step per class k and half set h (input split or index parity): padded accumulators S_k^h of
p alpha C X e^{..} / sigma2 and p alpha^2 C^2 / sigma2 (§1.5, ``backproject``). Maps: the
Wiener map of S_k^0 + S_k^1 with tau2 from the class's own half-map FSC (solvent-masked), then
V_k <- M_s (M_f V_k + (1 - M_f) V_bar) with the solvent mask M_s, the focus mask M_f (1 when
none is given) and the consensus map V_bar (§8.2 recommended design): classes differ only
inside the focus region, the rest of the particle is explained by the consensus.

Schedule (global iteration t counts O-EM and full iterations):
  O-EM   ``n_oem_epochs`` epochs over the particles in batches of ~batch_per_class x K (each
         epoch a fresh seeded permutation); S <- (1 - eta_t) S + eta_t (N / B) S_batch with
         eta_t = lr_init 0.5^(t / (h T_oem)), h = lr_half_life / 100 (0: constant); S starts
         at 0, so the first batch replaces the initial maps. Blending the accumulators rather
         than the maps [I, §1.12] keeps the S halves an exponential window of past batches:
         the class FSC (refreshed every ``fsc_every`` iterations) comes from them.
         pi <- (1 - eta) pi + eta mean_batch p.
  full   full EM passes (fresh S, all particles streamed in chunks) until, with beta = 0,
         < switch_tol of the particles change class between two consecutive passes (so at
         least two passes: the first compares with the classes of different O-EM maps, and was
         seen to stop while the soft class sizes were still moving) and, with ``rms_check``,
         the class-size weighted RMS map change, normalised by the consensus RMS inside M_s
         and averaged over the last two passes, is < rms_tol; at most ``max_full_iters`` passes.
  noise  sigma2 by shrinkage (``refine3d.update_noise``) of the posterior-weighted residuals.

Preparation (``prepare``): initial sigma2 from a random batch; the consensus map (given, or
reconstructed from all particles) scaled to the data (median least-squares scale); per-particle
scale alpha: none (1), input, or optimal (noise-weighted least squares against the consensus on
the classification band (§1.13), clipped to [0.2, 5] x median); sigma2 from the consensus
residuals of the batch; the solvent mask (given, or ``masks.threshold_mask`` of the consensus low-passed to
r_init); initial maps (given maps, or "simple": Wiener maps of K disjoint random subsets of
``init_subset`` particles) low-passed to r_init.

Memory: 2K padded accumulators, K maps, consensus and masks, one batch; per particle only
alpha, half set, last class and p (N, K).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from kernels.backend import to_host
from kernels.fourier import Band, lowpass
from kernels.fsc import fsc, resolution_at
from kernels.masks import threshold_mask
from kernels.noise import per_particle_scale
from kernels.posterior import class_posteriors
from kernels.projection import VolumeFT, prepare_volume, project
from kernels.reconstruction import Accumulator3D, backproject, tau2_from_fsc, wiener
from kernels.refine3d import initial_noise, noise_weights, update_noise
from kernels.scoring import particle_phases

Loader = Callable[[np.ndarray, Band], tuple[Any, Any]]
Progress = Callable[[str, int, int], None]

#: Per-particle scale clip, relative to the median (§1.13).
ALPHA_RANGE = (0.2, 5.0)
#: Particles of the random batch that initialises the noise model and the consensus scale.
NOISE_BATCH = 1000


@dataclass(frozen=True)
class Settings:
    """Options (shells / px of the working box D, pixel_size Å/px at D). r_max: band limit
    (target resolution), r_init: low-pass of the initial maps, r_hp: highpass (band r_hp < r);
    lr_half_life in % of the O-EM iterations (0: constant rate); fsc_every: O-EM iterations
    between class FSC updates; switch_tol: fraction of particles; init_subset: particles per
    class of the "simple" initialisation; mask_*: ``masks.threshold_mask`` of the consensus; chunk:
    particles per chunk of full passes; min_weight: smaller p_ik are not back-projected."""

    n_classes: int
    D: int
    pixel_size: float
    r_max: int
    r_init: float
    r_hp: int = 0
    n_oem_epochs: int = 2
    batch_per_class: int = 1000
    lr_init: float = 0.4
    lr_half_life: float = 50.0
    fsc_every: int = 10
    switch_tol: float = 0.02
    rms_check: bool = False
    rms_tol: float = 0.01
    max_full_iters: int = 25
    class_similarity: float = 0.5
    similarity_end: int = 10
    auto_similarity: bool = False
    target_ess_fraction: float = 0.75
    force_hard: bool = False
    scale_mode: Literal["none", "input", "optimal"] = "optimal"
    init_subset: int = 1000
    mask_threshold: float = 0.2
    mask_near_px: float = 1.25
    mask_far_px: float = 2.5
    chunk: int = 1000
    min_weight: float = 1e-4

    def beta(self, t: int, beta0: float) -> float:
        """Class similarity of iteration t: beta0 -> 0 linearly at ``similarity_end``."""
        if self.similarity_end <= 0:
            return 0.0
        return beta0 * max(0.0, 1.0 - t / self.similarity_end)

    def eta(self, t: int, n_oem: int) -> float:
        """O-EM learning rate of iteration t of n_oem."""
        h = self.lr_half_life / 100.0 * n_oem
        return self.lr_init if h <= 0 else self.lr_init * 0.5 ** (t / h)


def tune_similarity(p: np.ndarray, target_fraction: float) -> float:
    """Smallest beta in [0, 1] with mean ESS of (1 - beta) p + beta / K >= target x K
    (bisection; the ESS grows monotonically with beta). p (B, K) raw posteriors."""
    K = p.shape[1]

    def mean_ess(b: float) -> float:
        q = (1 - b) * p + b / K
        return float(np.mean(1.0 / (q * q).sum(axis=1)))

    lo, hi = 0.0, 1.0
    if mean_ess(lo) >= target_fraction * K:
        return 0.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if mean_ess(mid) >= target_fraction * K else (mid, hi)
    return hi


class Class3D:
    """State: maps ``vols`` (K, D, D, D), half accumulators ``acc[h][k]``, pi (K,), sigma2
    (D//2,), class FSC (K, D//2) and resolution (K,) Å, consensus map, solvent and focus masks;
    per particle alpha (N,), half set (N,), last class (N,) (-1 = unseen), p (N, K);
    iteration counters and per-iteration ``history``.

    R (N, 3, 3) and shifts (N, 2) px are the fixed poses; halves (N,) in {0, 1} the FSC split
    (default index parity)."""

    def __init__(self, settings: Settings, xp: ModuleType, R: np.ndarray, shifts: np.ndarray, seed: int,
                 halves: np.ndarray | None = None) -> None:
        s = settings
        self.s, self.xp, self.seed = s, xp, seed
        self.R = np.asarray(R, dtype=np.float64).reshape(-1, 3, 3)
        self.shifts = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
        N, K, D = self.R.shape[0], s.n_classes, s.D
        self.N = N
        self.halves = (np.arange(N) % 2 if halves is None else np.asarray(halves)).astype(np.int8)
        self.band = Band(D, s.r_max, r_min=s.r_hp)
        self._shells = self._shell_matrix()
        self.vols = xp.zeros((K, D, D, D), dtype=xp.float32)
        self.acc = self._new_accs(K)
        self.pi = np.full(K, 1.0 / K)
        self.sigma2 = xp.ones(D // 2)
        self.sigma2_0 = xp.ones(D // 2)
        self.fsc = np.zeros((K, D // 2))
        self.resolution = np.full(K, np.inf)
        self.consensus = xp.zeros((D, D, D), dtype=xp.float32)
        self.solvent = xp.ones((D, D, D), dtype=xp.float32)
        self.focus = xp.ones((D, D, D), dtype=xp.float32)
        self.alpha = np.ones(N)
        self.p = np.full((N, K), 1.0 / K)
        self.last = np.full(N, -1, dtype=np.int64)
        self.beta0 = s.class_similarity
        self.t = 0
        self.n_full = 0
        self.converged = False
        self.history: dict[str, list] = {k: [] for k in ("switched", "rms_change", "class_fractions",
                                                         "mean_class_ess", "eta", "beta", "full")}

    # ------------------------------------------------------------------ schedule
    @property
    def n_batches(self) -> int:
        """O-EM batches per epoch."""
        return max(1, round(self.N / max(self.s.batch_per_class * self.s.n_classes, 1)))

    @property
    def n_oem(self) -> int:
        """Total O-EM iterations T_oem."""
        return self.s.n_oem_epochs * self.n_batches

    @property
    def finished(self) -> bool:
        return self.converged or self.n_full >= self.s.max_full_iters

    @property
    def cls(self) -> np.ndarray:
        """Class (N,) of the last E-step (argmax p)."""
        return self.p.argmax(axis=1)

    @property
    def ess(self) -> np.ndarray:
        """Class ESS 1 / sum_k p_ik^2 (N,)."""
        return 1.0 / (self.p * self.p).sum(axis=1)

    def batch_indices(self, t: int) -> np.ndarray:
        """Sorted particle indices of O-EM iteration t (batch t % n of epoch t // n)."""
        n = self.n_batches
        perm = np.random.default_rng([self.seed, 3 << 20, t // n]).permutation(self.N)
        return np.sort(np.array_split(perm, n)[t % n])

    def _chunks(self, idx: np.ndarray, label: str, progress: Progress | None) -> Iterator[np.ndarray]:
        for i in range(0, idx.size, self.s.chunk):
            if progress is not None:
                progress(label, i, idx.size)
            yield idx[i : i + self.s.chunk]
        if progress is not None:
            progress(label, idx.size, idx.size)

    # ------------------------------------------------------------------ building blocks
    def _new_accs(self, K: int) -> list[list[Accumulator3D]]:
        return [[Accumulator3D(self.s.D, 2, self.xp) for _ in range(K)] for _ in range(2)]

    def _shell_matrix(self) -> Any:
        """(nF, n_shells) float64: band weight of pixel f in the column of its shell."""
        xp, b = self.xp, self.band
        m = xp.zeros((b.n, b.n_shells))
        m[xp.arange(b.n), b.on(xp, "shell")] = b.on(xp, "weight")
        return m

    def _shifted(self, X: Any, idx: np.ndarray) -> Any:
        """X e^{+2 pi i f.t/D}: particles with their shift undone (B, nF)."""
        return X * particle_phases(self.band, self.xp.asarray(self.shifts[idx]), self.xp)

    def _scaled_ctf(self, C: Any, idx: np.ndarray) -> Any:
        return C * self.xp.asarray(self.alpha[idx], dtype=self.xp.float32)[:, None]

    def _residual_power(self, X: Any, C: Any, idx: np.ndarray, vfts: list[VolumeFT]) -> Any:
        """Per-shell residual power sum_f w |X e^{..} - alpha C P V_k|^2 (B, K, n_shells) float64."""
        xp = self.xp
        Xs, aC, R = self._shifted(X, idx), self._scaled_ctf(C, idx), xp.asarray(self.R[idx])
        M = self._shells
        out = xp.empty((idx.size, len(vfts), self.band.n_shells))
        for k, v in enumerate(vfts):
            r = Xs - aC * project(v, R, self.band)
            out[:, k] = (r.real**2 + r.imag**2).astype(xp.float64) @ M
        return out

    def _posteriors(self, sp: Any) -> np.ndarray:
        """Class posteriors (B, K) softmax(-diff2 + log pi) from residual power sp (B, K, n_shells)."""
        xp = self.xp
        inv = 1.0 / xp.maximum(xp.asarray(self.sigma2[: self.band.n_shells], dtype=xp.float64), 1e-30)
        return class_posteriors(-to_host(0.5 * sp @ inv), np.log(np.maximum(self.pi, 1e-300)))[0]

    def posteriors(self, X: Any, C: Any, idx: np.ndarray) -> np.ndarray:
        """Class posteriors (B, K) of particles idx (X, C on ``band``) at the current maps,
        sigma2, pi and alpha (no class similarity)."""
        return self._posteriors(self._residual_power(X, C, idx, [prepare_volume(v) for v in self.vols]))

    def _mix(self, raw: np.ndarray, beta: float) -> np.ndarray:
        K = raw.shape[1]
        p = (1 - beta) * raw + beta / K
        return np.eye(K)[p.argmax(axis=1)] if self.s.force_hard else p

    def _insert(self, accs: list[list[Accumulator3D]], X: Any, C: Any, idx: np.ndarray, p: np.ndarray,
                scale: float) -> None:
        """Back-project the batch into accs[h][k] with weights scale x p_ik / sigma2 (§1.5)."""
        xp = self.xp
        aC = self._scaled_ctf(C, idx)
        nw = noise_weights(self.sigma2, self.band)
        halves = self.halves[idx]
        for h in (0, 1):
            for k in range(p.shape[1]):
                rows = np.flatnonzero((halves == h) & (p[:, k] > self.s.min_weight))
                if rows.size == 0:
                    continue
                r = xp.asarray(rows)
                w = xp.asarray(scale * p[rows, k])[:, None] * nw[None, :]
                backproject(accs[h][k], X[r], xp.asarray(self.R[idx[rows]]), self.band, ctf=aC[r],
                            shifts=xp.asarray(self.shifts[idx[rows]]), weights=w)

    def _half_fsc(self, a0: Accumulator3D, a1: Accumulator3D, mask: Any) -> np.ndarray:
        """FSC (D//2,) of the unregularised half maps (optionally masked), 0 beyond the band."""
        curve = to_host(fsc(wiener(a0), wiener(a1), mask))
        curve[self.band.n_shells :] = 0.0
        return curve

    def _class_map(self, a0: Accumulator3D, a1: Accumulator3D, curve: np.ndarray) -> Any:
        """Wiener map of both halves with tau2 from the half-map FSC ``curve`` (§1.5)."""
        full = Accumulator3D(self.s.D, 2, self.xp)
        full.add(a0)
        full.add(a1)
        return wiener(full, tau2_from_fsc(self.xp.asarray(curve), full, full=True))

    def _compose(self, v: Any) -> Any:
        """M_s (M_f v + (1 - M_f) V_bar) as float32."""
        return (self.solvent * (self.focus * v + (1 - self.focus) * self.consensus)).astype(self.xp.float32)

    def _update_maps(self, refresh_fsc: bool) -> np.ndarray:
        """New maps from the accumulators; returns the RMS change per class (K,) relative to
        the consensus RMS inside the solvent mask."""
        s, xp = self.s, self.xp
        old = self.vols
        new = []
        for k in range(s.n_classes):
            a0, a1 = self.acc[0][k], self.acc[1][k]
            if refresh_fsc:
                self.fsc[k] = self._half_fsc(a0, a1, self.solvent)
            new.append(self._compose(self._class_map(a0, a1, self.fsc[k])))
        self.vols = xp.stack(new)
        self.resolution = np.array([resolution_at(f, 0.143, s.D, s.pixel_size) for f in self.fsc])
        ref = float(xp.sqrt(xp.mean((self.solvent * self.consensus) ** 2)))
        diff = xp.sqrt(xp.mean((self.solvent[None] * (self.vols - old)) ** 2, axis=(1, 2, 3)))
        return to_host(diff) / max(ref, 1e-30)

    # ------------------------------------------------------------------ preparation
    def prepare(self, load: Loader, consensus: Any = None, solvent: Any = None, focus: Any = None,
                init_maps: Any = None, alpha: np.ndarray | None = None, progress: Progress | None = None) -> None:
        """Noise model, consensus, per-particle scale, masks and initial maps (module doc).

        consensus, solvent, focus (D, D, D) or None; init_maps (K, D, D, D) (None: "simple"
        initialisation); alpha (N,) for scale mode "input". ValueError when the consensus does
        not fit the particles (non-positive median scale) or the inputs are inconsistent.
        """
        s, xp = self.s, self.xp
        if s.scale_mode == "input":
            if alpha is None:
                raise ValueError("scale_mode 'input' needs alpha")
            self.alpha = np.asarray(alpha, dtype=np.float64).copy()
        elif s.scale_mode not in ("none", "optimal"):
            raise ValueError(f"scale_mode must be none, input or optimal, got {s.scale_mode!r}")
        full = Band(s.D, s.r_max)
        idx0 = np.sort(np.random.default_rng([self.seed, 1 << 20]).choice(self.N, min(self.N, NOISE_BATCH),
                                                                          replace=False))
        Xf, Cf = load(idx0, full)
        self.sigma2_0 = initial_noise(Xf, full, s.D)
        self.sigma2 = self.sigma2_0.copy()
        cols = xp.asarray(np.searchsorted(full.idx, self.band.idx))
        X0, C0 = Xf[:, cols], Cf[:, cols]
        if consensus is None:
            consensus = self._reconstruct(load, np.arange(self.N), np.zeros(self.N, np.int64), 1, progress)[0]
        self.consensus = xp.asarray(consensus, dtype=xp.float32)
        # the consensus in data units: median least-squares scale of the batch
        g = float(np.median(self._scales(X0, C0, idx0, prepare_volume(self.consensus),
                                         self.alpha[idx0] if s.scale_mode == "input" else None)))
        if not g > 0:
            raise ValueError(f"the consensus map does not fit the particles (median scale {g:.3g})")
        self.consensus = self.consensus * np.float32(g)
        vc = prepare_volume(self.consensus)
        if s.scale_mode == "optimal":
            a = np.ones(self.N)
            for idx in self._chunks(np.arange(self.N), "per-particle scale", progress):
                X, C = load(idx, self.band)
                a[idx] = self._scales(X, C, idx, vc)
            med = float(np.median(a))
            self.alpha = np.clip(a, ALPHA_RANGE[0] * med, ALPHA_RANGE[1] * med)
        sp = self._residual_power(X0, C0, idx0, [vc])[:, 0].sum(axis=0)
        self.sigma2_0 = update_noise(self.sigma2_0, self.sigma2_0, sp, self.band, idx0.size)
        self.sigma2 = self.sigma2_0.copy()
        smooth = lowpass(self.consensus, s.r_init, 1.0)
        self.solvent = (threshold_mask(smooth, s.mask_threshold, s.mask_near_px, s.mask_far_px) if solvent is None
                        else xp.asarray(solvent, dtype=xp.float32))
        if focus is not None:
            self.focus = xp.asarray(focus, dtype=xp.float32)
        starts = self._initial_maps(load, init_maps, progress)
        self.vols = xp.stack([self._compose(lowpass(v, s.r_init, 1.0)) for v in starts])

    def _scales(self, X: Any, C: Any, idx: np.ndarray, vft: VolumeFT, alpha: np.ndarray | None = None) -> np.ndarray:
        """Noise-weighted least-squares scale (B,) of particles idx against the map ``vft``
        (C times alpha if given)."""
        xp = self.xp
        if alpha is not None:
            C = C * xp.asarray(alpha, dtype=xp.float32)[:, None]
        CP = C * project(vft, xp.asarray(self.R[idx]), self.band)
        return to_host(per_particle_scale(self._shifted(X, idx), CP, noise_weights(self.sigma2, self.band),
                                          self.band.on(xp, "weight")))

    def _reconstruct(self, load: Loader, idx: np.ndarray, labels: np.ndarray, K: int,
                     progress: Progress | None) -> list[Any]:
        """Wiener maps (FSC-regularised) of particles idx grouped by labels (in 0..K-1)."""
        accs = self._new_accs(K)
        for part in self._chunks(np.arange(idx.size), "reconstruction", progress):
            X, C = load(idx[part], self.band)
            self._insert(accs, X, C, idx[part], np.eye(K)[labels[part]], 1.0)
        return [self._class_map(a0, a1, self._half_fsc(a0, a1, None)) for a0, a1 in zip(*accs, strict=True)]

    def _initial_maps(self, load: Loader, init_maps: Any, progress: Progress | None) -> list[Any]:
        """Given maps scaled to the consensus (real-space least squares in the solvent mask), or
        "simple" maps of K disjoint random subsets."""
        s, xp = self.s, self.xp
        K = s.n_classes
        if init_maps is not None:
            maps = [xp.asarray(v, dtype=xp.float32) for v in init_maps]
            if len(maps) != K:
                raise ValueError(f"{len(maps)} initial maps for {K} classes")
            ref = self.solvent * self.consensus
            return [v * float(xp.sum(ref * self.solvent * v)) / max(float(xp.sum((self.solvent * v) ** 2)), 1e-30)
                    for v in maps]
        n = max(1, min(s.init_subset, self.N // K))
        perm = np.random.default_rng([self.seed, 2 << 20]).permutation(self.N)[: n * K]
        order = np.argsort(perm)
        return self._reconstruct(load, perm[order], np.repeat(np.arange(K), n)[order], K, progress)

    # ------------------------------------------------------------------ iterations
    def step(self, load: Loader, progress: Progress | None = None) -> dict[str, Any]:
        """One O-EM iteration (t < T_oem) or one full pass; returns its metrics."""
        m = self._oem_iteration(load) if self.t < self.n_oem else self._full_iteration(load, progress)
        self.t += 1
        for key in self.history:
            self.history[key].append(m[key])
        return m

    def run(self, load: Loader, after: Callable[[dict[str, Any]], None] | None = None,
            progress: Progress | None = None) -> None:
        """Iterate until ``finished``; ``after(metrics)`` is called after each iteration."""
        while not self.finished:
            m = self.step(load, progress)
            if after is not None:
                after(m)

    def _beta(self, raw: np.ndarray) -> float:
        if self.t == 0 and self.s.auto_similarity and self.s.n_classes > 1:
            self.beta0 = tune_similarity(raw, self.s.target_ess_fraction)
        return self.s.beta(self.t, self.beta0)

    def _oem_iteration(self, load: Loader) -> dict[str, Any]:
        s, xp = self.s, self.xp
        idx = self.batch_indices(self.t)
        X, C = load(idx, self.band)
        sp = self._residual_power(X, C, idx, [prepare_volume(v) for v in self.vols])
        raw = self._posteriors(sp)
        beta = self._beta(raw)
        p = self._mix(raw, beta)
        eta = s.eta(self.t, self.n_oem)
        for row in self.acc:
            for a in row:
                a.data *= 1 - eta
                a.weight *= 1 - eta
        self._insert(self.acc, X, C, idx, p, eta * self.N / idx.size)
        refresh = self.t % max(s.fsc_every, 1) == 0 or self.t == self.n_oem - 1
        rms = self._update_maps(refresh)
        self.pi = (1 - eta) * self.pi + eta * p.mean(axis=0)
        resid = (xp.asarray(p)[:, :, None] * sp).sum(axis=(0, 1))
        self.sigma2 = update_noise(self.sigma2, self.sigma2_0, resid, self.band, idx.size)
        cls = p.argmax(axis=1)
        seen = self.last[idx] >= 0
        switched = float(np.mean(self.last[idx][seen] != cls[seen])) if seen.any() else 1.0
        self.last[idx] = cls
        self.p[idx] = p
        return self._metrics(False, switched, rms, eta, beta, p)

    def _full_iteration(self, load: Loader, progress: Progress | None) -> dict[str, Any]:
        s, xp = self.s, self.xp
        vfts = [prepare_volume(v) for v in self.vols]
        accs = self._new_accs(s.n_classes)
        resid = xp.zeros(self.band.n_shells)
        beta = None
        for idx in self._chunks(np.arange(self.N), f"full pass {self.n_full + 1}", progress):
            X, C = load(idx, self.band)
            sp = self._residual_power(X, C, idx, vfts)
            raw = self._posteriors(sp)
            beta = self._beta(raw) if beta is None else beta
            p = self._mix(raw, beta)
            self._insert(accs, X, C, idx, p, 1.0)
            resid += (xp.asarray(p)[:, :, None] * sp).sum(axis=(0, 1))
            self.p[idx] = p
        self.acc = accs
        rms = self._update_maps(True)
        self.pi = self.p.sum(axis=0) / self.N
        self.sigma2 = update_noise(self.sigma2, self.sigma2_0, resid, self.band, self.N)
        cls = self.cls
        switched = float(np.mean(cls != self.last))
        self.last = cls
        self.n_full += 1
        m = self._metrics(True, switched, rms, 1.0, float(beta), self.p)
        recent = [r for r, f in zip(self.history["rms_change"], self.history["full"], strict=True) if f][-1:]
        rms_mean = float(np.mean([m["rms_change"], *recent])) if recent else math.inf
        self.converged = (self.n_full >= 2 and beta == 0.0 and switched < s.switch_tol
                          and (not s.rms_check or rms_mean < s.rms_tol))
        return m

    def _metrics(self, full: bool, switched: float, rms: np.ndarray, eta: float, beta: float,
                 p: np.ndarray) -> dict[str, Any]:
        return {"full": full, "switched": switched, "rms_change": float(np.sum(self.pi * rms)),
                "class_fractions": [round(float(x), 4) for x in self.pi],
                "mean_class_ess": float(np.mean(1.0 / (p * p).sum(axis=1))), "eta": eta, "beta": beta,
                "resolution_A": [round(float(x), 2) for x in self.resolution]}

    # ------------------------------------------------------------------ outputs and state
    def order_by_size(self) -> np.ndarray:
        """Reorder the classes by decreasing particle count (ties: pi); returns the old index
        of each new class (K,)."""
        counts = np.bincount(self.cls, minlength=self.s.n_classes)
        perm = np.lexsort((-self.pi, -counts))
        self.vols = self.vols[self.xp.asarray(perm)]
        self.acc = [[row[k] for k in perm] for row in self.acc]
        self.pi, self.fsc, self.resolution = self.pi[perm], self.fsc[perm], self.resolution[perm]
        self.p = self.p[:, perm]
        inv = np.argsort(perm)
        self.last = np.where(self.last >= 0, inv[np.maximum(self.last, 0)], -1)
        self.history["class_fractions"] = [[f[k] for k in perm] for f in self.history["class_fractions"]]
        return perm

    def half_maps(self, k: int) -> tuple[Any, Any]:
        """Regularised half maps of class k (tau2 from the class FSC), unmasked."""
        a0, a1 = self.acc[0][k], self.acc[1][k]
        f = self.xp.asarray(self.fsc[k])
        return wiener(a0, tau2_from_fsc(f, a0)), wiener(a1, tau2_from_fsc(f, a1))

    def state(self) -> dict[str, np.ndarray]:
        """Host arrays that restore the engine with ``load_state``."""
        hist = {f"h_{k}": np.asarray(v, dtype=np.float64) for k, v in self.history.items()}
        return {"vols": to_host(self.vols), "pi": self.pi, "sigma2": to_host(self.sigma2),
                "sigma2_0": to_host(self.sigma2_0), "fsc": self.fsc, "resolution": self.resolution,
                "consensus": to_host(self.consensus), "solvent": to_host(self.solvent), "focus": to_host(self.focus),
                "alpha": self.alpha, "p": self.p, "last": self.last, "beta0": np.asarray(self.beta0),
                "counters": np.asarray([self.t, self.n_full, int(self.converged)]),
                "acc_data": np.stack([[to_host(a.data) for a in row] for row in self.acc]),
                "acc_weight": np.stack([[to_host(a.weight) for a in row] for row in self.acc]), **hist}

    def load_state(self, d: dict[str, np.ndarray]) -> None:
        xp = self.xp
        for key in ("vols", "sigma2", "sigma2_0", "consensus", "solvent", "focus"):
            setattr(self, key, xp.asarray(d[key]))
        self.pi, self.fsc, self.resolution = np.asarray(d["pi"]), np.asarray(d["fsc"]), np.asarray(d["resolution"])
        self.alpha, self.p, self.last = np.asarray(d["alpha"]), np.asarray(d["p"]), np.asarray(d["last"])
        self.beta0 = float(d["beta0"])
        self.t, self.n_full, conv = (int(x) for x in d["counters"])
        self.converged = bool(conv)
        for h, row in enumerate(self.acc):
            for k, a in enumerate(row):
                a.data, a.weight = xp.asarray(d["acc_data"][h, k]), xp.asarray(d["acc_weight"][h, k])
        for key in self.history:
            v = np.asarray(d[f"h_{key}"])
            self.history[key] = [bool(x) for x in v] if key == "full" else v.tolist()
