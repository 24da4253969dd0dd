"""2D classification engine: E-step over classes x in-plane angles x shifts, M-step with
half-set accumulators, online-EM blending, capacity-constrained assignment
(algorithms.md §1.5-§1.8, §1.11, §1.12, §3, §12.3).

Model of particle i in class k at pose (psi, t):  X_i = alpha_i C_i M(psi)[A_k] shifted by +t + N,
with M(psi)[A] the reference rotated by ``kernels.projection.rotate_2d`` (a feature at y in A
lands at inplane_matrices(psi) @ y) and per-shell noise sigma2(r) (per real component).

E-step (§12.2): references are rotated once per call (K x n_psi, shared by the batch) and
every particle is scored against every rotated reference at every integer shift of the window
(the disc |t| <= radius) as one real GEMM per particle chunk (``kernels.scoring``): on small
working boxes with a window of tens of shifts this is several times faster than one inverse
FFT per (particle, class, angle) (§12.3; measured in bench/class2d.py). The shift prior is
Gaussian N(0, (SHIFT_PRIOR_FRACTION * radius)^2), not annealed. Logits are
l = -diff2 / c_t^2 + log p(t); diff2 = 0.5 sum w |X e^{+2 pi i k.t/D} - alpha C A|^2, w = the
band's Hermitian weight / sigma2. Force-max keeps, per (particle, class), the best pose with
sub-pixel shift and psi from 3-point parabolas of the logits; marginalisation keeps the class
evidence (log-sum-exp over poses at temperature 1, divided by c_t^2: annealing flattens the
class posteriors, never the pose posteriors) and recomputes the pose posteriors per chunk in
the M-step.

M-step (§3.3): each particle's image is back-rotated into its classes (weights p_ik, pose
posteriors) in one of two half-set accumulators (parity of the particle index). Per class the
FRC of the unregularised half averages gives tau2 (full-FRC rule 2F/(1+F), T = 1); the class
average is the Wiener solution of the combined accumulators, then windowed, optionally clamped
to non-negative values and re-centred (centre of mass of the pixels above 0.2 x max; the
accumulators are shifted by the same amount).

Capacity-constrained assignment (``capacity_assign``): particles are taken in order of
decreasing confidence (max class posterior); each goes to its most probable class that still
has room, and its responsibilities for classes already full at that moment are set to zero and
the rest renormalised. No class receives more hard assignments than its capacity.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import memory_budget_bytes, to_host, xp_of
from kernels.fourier import Band, shift_phase, soft_circular_mask
from kernels.fsc import fsc, resolution_at
from kernels.grids import inplane_grid
from kernels.noise import per_particle_scale
from kernels.posterior import class_posteriors, posterior_weights
from kernels.projection import prepare_image, rotate_2d
from kernels.reconstruction import Accumulator2D, backproject, tau2_from_fsc, wiener
from kernels.scoring import diff2_chunk, particle_phases, prepare_particles

#: Gaussian shift prior sigma as a fraction of the shift-search radius.
SHIFT_PRIOR_FRACTION = 0.5
#: Class posteriors below this are not back-projected (force-max) / pose weights below it dropped.
MIN_WEIGHT = 1e-4
#: Re-centring threshold (fraction of the class maximum), cryoSPARC class2D_recenter_thresh.
RECENTER_THRESHOLD = 0.2
#: Per-particle scale clip range.
ALPHA_RANGE = (0.2, 5.0)
#: Noise-model shrinkage weight (images) towards the initial spectrum, cryoSPARC "noise priorw".
NOISE_PRIOR_WEIGHT = 50.0
#: Soft edge (px) of the class window.
WINDOW_EDGE_PX = 3.0


@dataclass(frozen=True)
class Settings:
    """Geometry and options of a 2D classification at the working box.

    D: working box (even); pixel_size: Å/px at D; r_max: band limit in shells (< D/2);
    psi_step_deg: finest in-plane step; shift_radius_px: shift-search disc radius (px at D);
    window_radius_px: class window radius (px, raised-cosine edge beyond it; None = D/2);
    force_max: max over poses (True) or marginalisation; recenter, clamp_solvent
    (non-negativity of class averages), per_particle_scale: options of §3.3 / §1.13.
    """

    n_classes: int
    D: int
    pixel_size: float
    r_max: int
    psi_step_deg: float
    shift_radius_px: float
    window_radius_px: float | None = None
    force_max: bool = True
    recenter: bool = True
    clamp_solvent: bool = False
    per_particle_scale: bool = False
    pad: int = 2


def anneal_factor(t: int, c0: float, start: int, n_iters: int) -> float:
    """ICUF annealing c_t (§1.6): c0 for t < start, c0^(1 - (t-start)/n) while annealing, then 1."""
    if t < start:
        return float(c0)
    if n_iters <= 0 or t >= start + n_iters:
        return 1.0
    return float(c0 ** (1.0 - (t - start) / n_iters))


def learning_rate(t: int) -> float:
    """Online-EM step eta_t (§3.4): 1 at t = 0, then max(0.5^(t/5), 0.1)."""
    return 1.0 if t == 0 else max(0.5 ** (t / 5.0), 0.1)


def psi_grid(settings: Settings, coarse: int = 1) -> np.ndarray:
    """In-plane angles (deg) at ``coarse`` times the finest step."""
    return inplane_grid(settings.psi_step_deg * coarse)


def shift_window(radius_px: float) -> np.ndarray:
    """Integer shifts (T, 2) (tx, ty) px within the disc of ``radius_px``."""
    n = int(math.floor(radius_px))
    g = np.arange(-n, n + 1)
    ty, tx = np.meshgrid(g, g, indexing="ij")
    keep = tx**2 + ty**2 <= radius_px**2 + 1e-9
    return np.stack([tx[keep], ty[keep]], axis=-1).astype(np.float64)


def window_neighbours(shifts: np.ndarray) -> np.ndarray:
    """(T, 2, 2) int64: for each window shift (tx, ty) and axis (x, y), the window indices of
    the shifts one pixel below and above along that axis, or -1 outside the window."""
    where = {(int(x), int(y)): i for i, (x, y) in enumerate(shifts)}
    out = np.full((len(shifts), 2, 2), -1, dtype=np.int64)
    for i, (x, y) in enumerate(shifts):
        for ax, (dx, dy) in enumerate(((1, 0), (0, 1))):
            out[i, ax, 0] = where.get((int(x) - dx, int(y) - dy), -1)
            out[i, ax, 1] = where.get((int(x) + dx, int(y) + dy), -1)
    return out


def capacity_assign(p: Any, capacity: Any) -> tuple[np.ndarray, np.ndarray]:
    """Hard classes (B,) and capped responsibilities (B, K) for posteriors p (B, K).

    capacity: (K,) or scalar, the number of particles each class may still take, or None
    (argmax, p unchanged). Greedy in order of decreasing max posterior (ties by index); see
    the module docstring. Requires sum(capacity) >= B. Host NumPy.
    """
    p = to_host(p).astype(np.float64)
    B, K = p.shape
    if capacity is None:
        return p.argmax(axis=1), p
    room = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (K,)).copy()
    if room.sum() < B:
        raise ValueError(f"class capacities {room.sum()} < {B} particles")
    order = np.lexsort((np.arange(B), -p.max(axis=1)))
    hard = np.empty(B, dtype=np.int64)
    out = p.copy()
    open_ = room > 0
    for i in order:
        row = np.where(open_, p[i], -1.0)
        k = int(row.argmax())
        hard[i] = k
        if not open_.all():
            q = np.where(open_, p[i], 0.0)
            s = q.sum()
            out[i] = q / s if s > 0 else np.eye(K)[k]
        room[k] -= 1
        if room[k] == 0:
            open_[k] = False
    return hard, out


@dataclass
class EStep:
    """E-step result of a batch (host or device arrays as noted).

    loglik (B, K) float64: per-class log evidence at temperature c_t^2, WITHOUT log pi
    (force-max: best logit; marginal: log-sum-exp over poses); psi (B, K) deg and shift
    (B, K, 2) px (tx, ty): best pose per class (sub-pixel refined); psi_index (B, K) the grid
    index of the best psi; pose_ess (B, K) (1 for force-max).
    """

    loglik: Any
    psi: Any
    shift: Any
    psi_index: Any
    pose_ess: Any


@dataclass
class Stats:
    """Sufficient statistics: half-set accumulators, per-shell residual power, class mass."""

    halves: list[Accumulator2D]
    resid: Any  # (n_shells,) float64: sum_i sum_k p_ik sum_shell weight |residual|^2
    images: float  # sum of p over the batch (= number of images)
    mass: Any  # (K,) float64

    def scale(self, f: float) -> None:
        for a in self.halves:
            a.data *= f
            a.weight *= f
        self.resid = self.resid * f
        self.images *= f
        self.mass = self.mass * f

    def add(self, other: Stats, f: float = 1.0) -> None:
        for a, b in zip(self.halves, other.halves, strict=True):
            a.data += f * b.data
            a.weight += f * b.weight
        self.resid = self.resid + f * other.resid
        self.images += f * other.images
        self.mass = self.mass + f * other.mass


class Classifier2D:
    """State of a 2D classification: class averages, priors, noise model, accumulators.

    Memory: the (2, K, pD, pD//2+1) accumulators plus one batch; nothing scales with the
    number of particles. ``refs`` (K, D, D) float32; ``pi`` (K,); ``sigma2`` (n_shells,).
    """

    def __init__(self, settings: Settings, xp: ModuleType) -> None:
        s = settings
        if not s.r_max < s.D / 2:
            raise ValueError(f"r_max {s.r_max} must be < D/2 = {s.D / 2}")
        self.s = s
        self.xp = xp
        self.band = Band(s.D, s.r_max)
        K = s.n_classes
        self.refs = xp.zeros((K, s.D, s.D), dtype=xp.float32)
        self.pi = xp.full(K, 1.0 / K)
        self.sigma2 = xp.ones(self.band.n_shells)
        self.sigma2_0 = xp.ones(self.band.n_shells)
        self.stats = self.empty_stats()
        self.frc = xp.zeros((K, s.D // 2))
        self.resolution = np.full(K, np.inf)
        radius = s.D / 2 - WINDOW_EDGE_PX if s.window_radius_px is None else s.window_radius_px
        self.window = soft_circular_mask(s.D, radius, WINDOW_EDGE_PX, xp)
        self._shifts = shift_window(s.shift_radius_px)
        sd = max(SHIFT_PRIOR_FRACTION * s.shift_radius_px, 0.5)
        self._log_prior_t = xp.asarray(-(self._shifts**2).sum(axis=1) / (2 * sd**2), dtype=xp.float32)
        self._phases = particle_phases(self.band, xp.asarray(self._shifts), xp)  # (T, nF)
        self._neighbours = xp.asarray(window_neighbours(self._shifts))
        self._npix = xp.asarray(np.bincount(self.band.shell, weights=self.band.weight,
                                            minlength=self.band.n_shells))

    # -- statistics ------------------------------------------------------------------------
    def empty_stats(self) -> Stats:
        s, xp = self.s, self.xp
        halves = [Accumulator2D(s.D, s.pad, xp, s.n_classes) for _ in range(2)]
        return Stats(halves, xp.zeros(self.band.n_shells), 0.0, xp.zeros(s.n_classes))

    def init_noise(self, X: Any) -> None:
        """sigma2_0(r) (§1.6, RELION): <|X|^2>/2 minus |<X>|^2/2 per shell, from X (B, nF);
        non-positive shells take their nearest positive neighbour."""
        xp = self.xp
        w = self.band.on(xp, "weight")
        sh = self.band.on(xp, "shell")
        X = X.astype(xp.complex128)
        pw = xp.mean(xp.abs(X) ** 2, axis=0) - xp.abs(X.mean(axis=0)) ** 2
        num = xp.bincount(sh, weights=w * pw, minlength=self.band.n_shells)
        s2 = to_host(xp.where(self._npix > 0, num / (2 * xp.maximum(self._npix, 1e-30)), 0.0))
        good = np.flatnonzero(s2 > 0)
        if good.size == 0:
            raise ValueError("images carry no power in the band")
        for r in range(1, s2.size):
            if s2[r] <= 0:
                s2[r] = s2[good[np.abs(good - r).argmin()]]
        s2[0] = s2[1] if s2.size > 1 else s2[0]
        self.sigma2_0 = xp.asarray(s2)
        self.sigma2 = xp.asarray(s2)

    def inv_sigma2(self) -> Any:
        """1/sigma2 per band pixel (nF,) float64 (no Hermitian weight)."""
        return 1.0 / self.sigma2[self.band.on(self.xp, "shell")]

    # -- E-step ----------------------------------------------------------------------------
    def rotated_refs(self, psis: np.ndarray) -> Any:
        """Rotated references on the band (K, n_psi, nF) complex64."""
        ift = prepare_image(self.refs, self.s.pad)
        return rotate_2d(ift, psis, self.band).astype(self.xp.complex64)

    def _chunk(self, B: int, n_refs: int) -> int:
        """Particles per E-step chunk: the (bc, T, n_refs) float32 scores and their float64
        work copies within a memory budget."""
        T = self._shifts.shape[0]
        budget = min(memory_budget_bytes(0.05), 512 << 20)
        return int(max(1, min(B, budget // (T * n_refs * 24))))

    def window_logits(
        self, X: Any, C: Any, psis: np.ndarray, temperature: float, A: Any | None = None
    ) -> Iterator[tuple[slice, Any]]:
        """Yield (particle slice, logits (bc, K, n_psi, T) float32) chunk by chunk.

        logits = -diff2 / temperature + log p(t) for every class, in-plane angle and integer
        shift of the window, scored as one GEMM per chunk (``kernels.scoring``, §12.2);
        diff2 = 0.5 sum w |X e^{+2 pi i k.t/D} - C A|^2 with w = Hermitian weight / sigma2.
        C includes alpha.
        """
        xp = self.xp
        A = self.rotated_refs(psis) if A is None else A
        K, n_psi, nF = A.shape
        w = self.band.on(xp, "weight") * self.inv_sigma2()
        refs = A.reshape(K * n_psi, nF)
        B, T = X.shape[0], self._shifts.shape[0]
        bc = self._chunk(B, K * n_psi)
        inv_t = np.float32(-1.0 / temperature)
        for b0 in range(0, B, bc):
            sl = slice(b0, min(b0 + bc, B))
            parts = prepare_particles(X[sl], C[sl], w, self._phases)
            d = diff2_chunk(parts, refs)  # (bc, T, K * n_psi)
            d *= inv_t
            d += self._log_prior_t[None, :, None]
            yield sl, xp.ascontiguousarray(d.reshape(-1, T, K, n_psi).transpose(0, 2, 3, 1))

    def expectation(self, X: Any, C: Any, psis: np.ndarray, temperature: float = 1.0) -> EStep:
        """Per-class evidence and best poses for a batch: X (B, nF) band data, C (B, nF) CTF
        times alpha, psis (n_psi,) deg grid, temperature c_t^2.

        Force-max: the class evidence is the best logit at the temperature. Marginalisation:
        log-sum-exp over poses at temperature 1, then divided by the temperature, so annealing
        flattens the class posteriors only and never the pose posteriors."""
        xp, s = self.xp, self.s
        B, K, n_psi = X.shape[0], s.n_classes, psis.size
        T = self._shifts.shape[0]
        loglik = xp.zeros((B, K))
        psi = xp.zeros((B, K))
        psi_idx = xp.zeros((B, K), dtype=xp.int64)
        shift = xp.zeros((B, K, 2))
        pose_ess = xp.ones((B, K))
        step = 360.0 / n_psi
        shifts = xp.asarray(self._shifts)
        pose_t = temperature if s.force_max else 1.0
        for sl, lg in self.window_logits(X, C, psis, pose_t):
            bc = lg.shape[0]
            flat = lg.reshape(bc, K, n_psi * T)
            a = xp.argmax(flat, axis=2)
            best = xp.take_along_axis(flat, a[..., None], axis=2)[..., 0]
            j, t = a // T, a % T
            if s.force_max:
                loglik[sl] = best
            else:
                e = xp.exp((flat - best[..., None]).astype(xp.float64))
                s1 = e.sum(axis=2)
                loglik[sl] = (best + xp.log(s1)) / temperature
                pose_ess[sl] = s1**2 / (e * e).sum(axis=2)
            # psi parabola on the max-over-shift logits of neighbouring angles
            per_psi = lg.max(axis=3)  # (bc, K, n_psi)
            vm = xp.take_along_axis(per_psi, ((j - 1) % n_psi)[..., None], axis=2)[..., 0]
            vp = xp.take_along_axis(per_psi, ((j + 1) % n_psi)[..., None], axis=2)[..., 0]
            dpsi = _parabola(vm, best, vp) if n_psi > 2 else xp.zeros_like(vm)
            psi[sl] = (xp.asarray(psis)[j] + step * dpsi) % 360.0
            psi_idx[sl] = j
            shift[sl] = shifts[t] + self._subpixel(flat, j, t, best)
        return EStep(loglik, psi, shift, psi_idx, pose_ess)

    def _subpixel(self, flat: Any, j: Any, t: Any, best: Any) -> Any:
        """Parabolic sub-pixel offsets (bc, K, 2) from the logits flat (bc, K, n_psi * T) of the
        window neighbours of the best integer shifts t (bc, K) at psi indices j; zero on an axis
        whose neighbours are not both in the window."""
        xp = self.xp
        T = self._shifts.shape[0]
        out = []
        for ax in (0, 1):
            nb = self._neighbours[t, ax]  # (bc, K, 2) window index of t -/+ 1 along ax, or -1
            both = (nb >= 0).all(axis=-1)
            vals = [xp.take_along_axis(flat, (j * T + xp.maximum(nb[..., d], 0))[..., None],
                                       axis=2)[..., 0] for d in (0, 1)]
            vm, vp = (xp.where(both, v, best) for v in vals)
            out.append(_parabola(vm.astype(xp.float64), best.astype(xp.float64), vp.astype(xp.float64)))
        return xp.stack(out, axis=-1)

    # -- M-step ----------------------------------------------------------------------------
    def accumulate(
        self,
        stats: Stats,
        X: Any,
        C: Any,
        p: Any,
        e: EStep,
        halves: Any,
        psis: np.ndarray,
        best_pose: bool = False,
    ) -> None:
        """Add a batch to ``stats``: X (B, nF), C (B, nF) CTF x alpha, p (B, K) responsibilities,
        e its E-step (same psis grid), halves (B,) in {0, 1}. With marginalisation,
        ``best_pose`` inserts each image at its best pose per class instead of over the pose
        posterior (used while the noise is annealed, see ``OnlineEM``)."""
        xp, s, band = self.xp, self.s, self.band
        p = xp.asarray(p, dtype=xp.float64)
        halves = np.asarray(halves, dtype=np.int64)
        w_s = self.inv_sigma2()
        A = self.rotated_refs(psis)
        b_idx, k_idx = (to_host(a) for a in xp.nonzero(p >= MIN_WEIGHT))
        if s.force_max or best_pose:
            self._insert_best(stats, X, C, p, e, halves, b_idx, k_idx, w_s)
        else:
            self._insert_marginal(stats, X, C, p, psis, halves, A, w_s)
        # noise: residual at the best pose of each class, weighted by p
        if b_idx.size:
            Ab = A[xp.asarray(k_idx), e.psi_index[b_idx, k_idx]]
            ph = shift_phase(s.D, e.shift[b_idx, k_idx], band, dtype=xp.complex128, xp=xp).conj()
            r = X[b_idx].astype(xp.complex128) * ph - C[b_idx].astype(xp.float64) * Ab
            pw = (r.real**2 + r.imag**2) * band.on(xp, "weight")
            pw = pw * p[b_idx, k_idx][:, None]
            stats.resid = stats.resid + xp.bincount(
                xp.broadcast_to(band.on(xp, "shell"), pw.shape).ravel(), weights=pw.ravel(),
                minlength=band.n_shells)
        stats.images += float(p.sum())
        stats.mass = stats.mass + p.sum(axis=0)

    def _insert_best(self, stats: Stats, X: Any, C: Any, p: Any, e: EStep, halves: np.ndarray,
                     b_idx: np.ndarray, k_idx: np.ndarray, w_s: Any) -> None:
        for h in (0, 1):
            sel = halves[b_idx] == h
            bi, ki = b_idx[sel], k_idx[sel]
            if bi.size == 0:
                continue
            backproject(
                stats.halves[h], X[bi], to_host(e.psi[bi, ki]), self.band, ctf=C[bi],
                shifts=e.shift[bi, ki], weights=p[bi, ki][:, None] * w_s[None, :],
                classes=ki,
            )

    def _insert_marginal(self, stats: Stats, X: Any, C: Any, p: Any, psis: np.ndarray,
                         halves: np.ndarray, A: Any, w_s: Any) -> None:
        """Marginal M-step: per half, class k and grid angle psi_j, sum in the particle frame
        sum_{b,t} p_bk gamma_b(j, t | k) X_b C_b w e^{+2 pi i k.t/D} (and the CTF^2 weights)
        as GEMMs over the pose posteriors gamma (temperature 1), then back-rotate each of the
        2 x K x n_psi sums once."""
        xp, band = self.xp, self.band
        w = band.on(xp, "weight") * w_s
        K, n_psi, nF = A.shape
        vals = xp.zeros((2, K * n_psi, 2 * nF), dtype=xp.float64)
        wts = xp.zeros((2, K * n_psi, nF), dtype=xp.float64)
        for sl, lg in self.window_logits(X, C, psis, 1.0, A):
            bc, T = lg.shape[0], lg.shape[3]
            flat = lg.reshape(bc * K, -1)
            m = flat.max(axis=1, keepdims=True).astype(xp.float64)
            lse = m[:, 0] + xp.log(xp.exp(flat - m).sum(axis=1))
            g = posterior_weights(flat, lse).reshape(lg.shape)
            g *= p[sl][:, :, None, None].astype(xp.float32)
            parts = prepare_particles(X[sl], C[sl], w, self._phases)  # Y rows (b, t)
            G = g.transpose(1, 2, 0, 3).reshape(K * n_psi, bc * T)
            per_psi = g.sum(axis=3).reshape(bc, K * n_psi).astype(xp.float64)
            h = xp.asarray(halves[sl])
            for half in (0, 1):
                rows = h == half
                Gh = G.reshape(K * n_psi, bc, T)[:, rows].reshape(K * n_psi, -1)
                vals[half] += Gh @ parts.Y.reshape(bc, T, 2 * nF)[rows].reshape(-1, 2 * nF)
                wts[half] += per_psi[rows].T @ parts.ctf2w[rows]
        for half in (0, 1):
            stats.halves[half].insert(vals[half, :, :nF] + 1j * vals[half, :, nF:], wts[half],
                                      np.tile(psis, K), band, classes=np.repeat(np.arange(K), n_psi))

    def blend(self, batch: Stats, eta: float, scale: float) -> None:
        """Online EM (§1.12): S <- (1 - eta) S + eta * scale * S_batch."""
        self.stats.scale(1.0 - eta)
        self.stats.add(batch, eta * scale)

    def maximize(self) -> Any:
        """New class averages, priors, noise model and per-class FRC/resolution from ``stats``.

        Returns the re-centring shifts (K, 2) px applied to the classes (content moved by them).
        """
        xp, s, st = self.xp, self.s, self.stats
        full = Accumulator2D(s.D, s.pad, xp, s.n_classes)
        for a in st.halves:
            full.add(a)
        raw = [wiener(a) for a in st.halves]
        self.frc = fsc(raw[0] * self.window, raw[1] * self.window, ndim=2)
        tau2 = tau2_from_fsc(self.frc, full, full=True)
        refs = wiener(full, tau2, T=1.0, mask=self.window)
        if s.clamp_solvent:
            refs = xp.maximum(refs, 0.0)
        moves = xp.zeros((s.n_classes, 2))
        if s.recenter:
            moves = -self._centre_of_mass(refs)
            refs = _shift_real(refs, moves)
            for a in st.halves:
                _shift_accumulator(a, moves)
        self.refs = refs.astype(xp.float32)
        self.pi = st.mass / max(float(st.mass.sum()), 1e-300)
        if st.images > 0:
            s2 = st.resid / (2 * xp.maximum(self._npix, 1e-30))
            self.sigma2 = (NOISE_PRIOR_WEIGHT * self.sigma2_0 + s2) / (NOISE_PRIOR_WEIGHT + st.images)
            self.sigma2[0] = self.sigma2[1] if self.sigma2.size > 1 else self.sigma2[0]
        frc = to_host(self.frc)
        self.resolution = np.array([resolution_at(f, 0.143, s.D, s.pixel_size) for f in frc])
        return moves

    def _centre_of_mass(self, refs: Any) -> Any:
        """Grey-value centre of mass (K, 2) (x, y) px from the box centre of pixels above
        RECENTER_THRESHOLD x max, clipped to the shift radius."""
        xp, D = self.xp, self.s.D
        c = xp.arange(D, dtype=xp.float64) - D // 2
        mx = refs.reshape(refs.shape[0], -1).max(axis=1)
        w = xp.where(refs > RECENTER_THRESHOLD * mx[:, None, None], refs, 0.0).astype(xp.float64)
        tot = w.sum(axis=(1, 2))
        safe = xp.where(tot > 0, tot, 1.0)
        com = xp.stack([(w * c[None, None, :]).sum(axis=(1, 2)) / safe,
                        (w * c[None, :, None]).sum(axis=(1, 2)) / safe], axis=-1)
        com = xp.where(tot[:, None] > 0, com, 0.0)
        r = xp.sqrt((com**2).sum(axis=1, keepdims=True))
        lim = self.s.shift_radius_px
        return com * xp.minimum(1.0, lim / xp.maximum(r, 1e-12))

    # -- seeding and class replacement -------------------------------------------------------
    def seed(self, X: Any, C: Any, rng: np.random.Generator, halves: Any) -> None:
        """Initial averages (§3.4): K disjoint random subsets of the batch, random in-plane
        angles, zero shifts, hard weights; then ``maximize``."""
        xp, K = self.xp, self.s.n_classes
        B = X.shape[0]
        if B < K:
            raise ValueError(f"seeding needs at least {K} particles, got {B}")
        cls = rng.permutation(B) % K
        psi = rng.uniform(0.0, 360.0, B)
        w_s = self.inv_sigma2()
        halves = np.asarray(halves)
        self.stats = self.empty_stats()
        for h in (0, 1):
            sel = np.flatnonzero(halves == h)
            backproject(self.stats.halves[h], X[sel], psi[sel], self.band, ctf=C[sel],
                        weights=xp.broadcast_to(w_s, (sel.size, w_s.size)), classes=cls[sel])
        self.stats.mass = xp.asarray(np.bincount(cls, minlength=K).astype(np.float64))
        self.stats.images = float(B)
        recenter = self.s.recenter
        self.s = _replace(self.s, recenter=False)
        sigma2 = self.sigma2
        self.maximize()
        self.s = _replace(self.s, recenter=recenter)
        self.sigma2 = sigma2

    def reseed_empty(self, p: np.ndarray, hard: np.ndarray, rng: np.random.Generator,
                     threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Class replacement (§3.4): each class with pi_k < threshold takes a random half of the
        batch particles whose hard class is the largest class (hard, one-hot p)."""
        pi = to_host(self.pi)
        p, hard = p.copy(), hard.copy()
        K = pi.size
        for k in np.flatnonzero(pi < threshold):
            j = int(np.bincount(hard, minlength=K).argmax())
            members = np.flatnonzero(hard == j)
            take = rng.permutation(members)[: members.size // 2]
            hard[take] = k
            p[take] = np.eye(K)[k]
        return p, hard

    # -- per-particle scale and checkpoint state ----------------------------------------------
    def scales(self, X: Any, C: Any, e: EStep, hard: np.ndarray, psis: np.ndarray) -> Any:
        """Least-squares amplitude alpha (B,) of each particle against its class at its pose,
        clipped to ALPHA_RANGE; C without alpha."""
        xp = self.xp
        A = self.rotated_refs(psis)
        k = xp.asarray(hard)
        b = xp.arange(X.shape[0])
        CP = C.astype(xp.float64) * A[k, e.psi_index[b, k]]
        ph = shift_phase(self.s.D, e.shift[b, k], self.band, dtype=xp.complex128, xp=xp).conj()
        a = per_particle_scale(X * ph, CP, self.inv_sigma2(), self.band.on(xp, "weight"))
        return xp.clip(a, *ALPHA_RANGE)

    def state(self) -> dict[str, np.ndarray]:
        """Host arrays that restore this classifier with ``load_state``."""
        st = self.stats
        return {
            "refs": to_host(self.refs), "pi": to_host(self.pi), "sigma2": to_host(self.sigma2),
            "sigma2_0": to_host(self.sigma2_0), "frc": to_host(self.frc),
            "resolution": self.resolution,
            "acc_data": np.stack([to_host(a.data) for a in st.halves]),
            "acc_weight": np.stack([to_host(a.weight) for a in st.halves]),
            "resid": to_host(st.resid), "images": np.asarray(st.images), "mass": to_host(st.mass),
        }

    def load_state(self, d: dict[str, np.ndarray]) -> None:
        xp = self.xp
        self.refs = xp.asarray(d["refs"])
        self.pi, self.sigma2 = xp.asarray(d["pi"]), xp.asarray(d["sigma2"])
        self.sigma2_0, self.frc = xp.asarray(d["sigma2_0"]), xp.asarray(d["frc"])
        self.resolution = np.asarray(d["resolution"])
        st = self.empty_stats()
        for h, a in enumerate(st.halves):
            a.data, a.weight = xp.asarray(d["acc_data"][h]), xp.asarray(d["acc_weight"][h])
        st.resid, st.images, st.mass = xp.asarray(d["resid"]), float(d["images"]), xp.asarray(d["mass"])
        self.stats = st

    def posteriors(self, e: EStep) -> tuple[Any, Any]:
        """Class posteriors (B, K) and class ESS (B,) with the current priors pi."""
        xp = self.xp
        log_pi = xp.log(xp.maximum(self.pi, 1e-300))
        return class_posteriors(e.loglik, log_pi)


def _replace(s: Settings, **kw: Any) -> Settings:
    from dataclasses import replace

    return replace(s, **kw)


def _parabola(vm: Any, v0: Any, vp: Any) -> Any:
    """Vertex offset in [-0.5, 0.5] of the parabola through (-1, vm), (0, v0), (1, vp)."""
    xp = xp_of(v0)
    den = vm - 2 * v0 + vp
    safe = xp.where(den < 0, den, -1.0)
    return xp.where(den < 0, xp.clip(0.5 * (vm - vp) / safe, -0.5, 0.5), 0.0)


def _shift_real(images: Any, shifts: Any) -> Any:
    """Images (K, D, D) with content moved by shifts (K, 2) px (Fourier phase ramp)."""
    from kernels.fourier import shift_images

    return shift_images(images, shifts)


def _shift_accumulator(acc: Accumulator2D, shifts: Any) -> None:
    """Move the content of each class's accumulated data by shifts (K, 2) px (weights unchanged)."""
    xp = acc.xp
    ph = shift_phase(acc.n, xp.asarray(shifts, dtype=xp.float64), xp=xp)  # (K, n, n//2+1)
    acc.data *= ph


@dataclass(frozen=True)
class Schedule:
    """Online-EM schedule (§3.4): iterations, batch size, annealing, cap, class replacement.

    max_per_class: capacity of each class in particles (None = no cap); in an O-EM batch of B
    of N particles a class may take ceil(cap * B / N); in a full pass the quota grows in
    proportion to the particles seen (ceil(cap * m / N) after m particles), reaching cap.
    """

    num_oem_iterations: int = 20
    batch_size: int = 5000
    num_full_iterations: int = 1
    icuf: float = 2.0
    anneal: bool = True
    anneal_start: int = 2
    anneal_iters: int = 15
    max_per_class: int | None = None
    coarse_psi_iterations: int = 5
    reseed_after: int = 5

    def temperature(self, t: int) -> float:
        """c_t^2 at O-EM iteration t (0-based); 1 when annealing is off."""
        if not self.anneal:
            return 1.0
        return anneal_factor(t, self.icuf, self.anneal_start, self.anneal_iters) ** 2


@dataclass
class Assignment:
    """Per-particle results of a pass (host arrays, length B or N).

    cls: hard class; psi deg; shift (., 2) px at the working box (content moved by +t);
    max_prob: posterior of the hard class; class_ess; pose_ess; loglik: log-likelihood
    (-diff2) of the hard class at its pose (temperature of the pass); alpha.
    """

    cls: np.ndarray
    psi: np.ndarray
    shift: np.ndarray
    max_prob: np.ndarray
    class_ess: np.ndarray
    pose_ess: np.ndarray
    loglik: np.ndarray
    alpha: np.ndarray


def _take(a: Any, hard: np.ndarray) -> np.ndarray:
    a = to_host(a)
    return a[np.arange(hard.size), hard]


class OnlineEM:
    """Drives a ``Classifier2D`` through the online-EM and full iterations for N particles.

    Batches come from a loader ``load(indices (B,) sorted int64) -> (X (B, nF), C (B, nF))``
    (band data and CTF at the working box); full passes take an iterable of
    (indices, X, C). Batch t of the O-EM phase is positions [t*B, (t+1)*B) of the
    concatenation of per-epoch permutations ``default_rng([seed, epoch]).permutation(N)``,
    so a resumed run sees the same batches. Keeps alpha (N,) (per-particle scale).

    With marginalisation, the M-step inserts images at their best poses while c_t > 1 and
    over the full pose posterior from then on: from blurry seeds the early pose posteriors
    are nearly uniform (median pose ESS ~600 in the first iteration of the tests' 5-view set),
    and averaging over them makes every class the same rotationally blurred blob, which then
    absorbs most views (ARI 0.78-0.85 instead of 0.99).
    """

    def __init__(self, clf: Classifier2D, schedule: Schedule, n_particles: int, seed: int) -> None:
        K = clf.s.n_classes
        cap = schedule.max_per_class
        if cap is not None and cap * K < n_particles:
            raise ValueError(f"max_per_class {cap} x {K} classes < {n_particles} particles")
        self.clf, self.sch, self.N, self.seed = clf, schedule, n_particles, seed
        self.alpha = np.ones(n_particles)

    def batch_indices(self, t: int) -> np.ndarray:
        B = min(self.sch.batch_size, self.N)
        start = t * B
        out: list[np.ndarray] = []
        while sum(a.size for a in out) < B:
            epoch, pos = divmod(start, self.N)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.N)
            take = perm[pos : pos + B - sum(a.size for a in out)]
            out.append(take)
            start += take.size
        return np.sort(np.concatenate(out))

    def seed_classes(self, load: Any) -> None:
        """Noise model from the first batch (at most 1,000 particles) and initial averages."""
        idx = self.batch_indices(0)
        X, C = load(idx)
        self.clf.init_noise(X[:1000])
        self.clf.seed(X, C, np.random.default_rng([self.seed, 1 << 20]), idx % 2)

    def _psis(self, t: int | None) -> np.ndarray:
        coarse = 2 if t is not None and t < self.sch.coarse_psi_iterations else 1
        return psi_grid(self.clf.s, coarse)

    def _assign(self, e: EStep, quota: Any, rng: np.random.Generator | None,
                reseed: bool) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        p, ess_c = self.clf.posteriors(e)
        hard, pc = capacity_assign(p, quota)
        if reseed and rng is not None:
            pc, hard = self.clf.reseed_empty(pc, hard, rng, 0.2 / self.clf.s.n_classes)
        return p, hard, pc, ess_c

    def _record(self, idx: np.ndarray, e: EStep, hard: np.ndarray, pc: np.ndarray,
                X: Any, C: Any, psis: np.ndarray) -> Assignment:
        if self.clf.s.per_particle_scale:
            self.alpha[idx] = to_host(self.clf.scales(X, C, e, hard, psis))
        pn = pc / pc.sum(axis=1, keepdims=True)
        return Assignment(
            cls=hard, psi=_take(e.psi, hard), shift=to_host(e.shift)[np.arange(hard.size), hard],
            max_prob=pn[np.arange(hard.size), hard], class_ess=1.0 / (pn * pn).sum(axis=1),
            pose_ess=_take(e.pose_ess, hard), loglik=_take(e.loglik, hard),
            alpha=self.alpha[idx].copy(),
        )

    def oem_iteration(self, t: int, load: Any) -> tuple[np.ndarray, Assignment]:
        """One O-EM iteration on batch t; returns (indices, assignment of the batch)."""
        clf, sch = self.clf, self.sch
        idx = self.batch_indices(t)
        X, C0 = load(idx)
        C = C0 * clf.xp.asarray(self.alpha[idx])[:, None]
        psis = self._psis(t)
        temp = sch.temperature(t)
        e = clf.expectation(X, C, psis, temp)
        quota = None
        if sch.max_per_class is not None:
            quota = math.ceil(sch.max_per_class * idx.size / self.N)
        rng = np.random.default_rng([self.seed, 2 << 20, t])
        _, hard, pc, _ = self._assign(e, quota, rng, t >= sch.reseed_after)
        batch = clf.empty_stats()
        clf.accumulate(batch, X, C, clf.xp.asarray(pc), e, idx % 2, psis, best_pose=temp > 1.0)
        clf.blend(batch, learning_rate(t), self.N / idx.size)
        moves = clf.maximize()
        out = self._record(idx, e, hard, pc, X, C0, psis)
        _recentre(out, to_host(moves))
        return idx, out

    def full_iteration(self, batches: Any) -> Assignment:
        """A full EM pass (c = 1, eta = 1) over all particles; returns their assignment with
        poses relative to the updated (re-centred) classes."""
        clf, sch = self.clf, self.sch
        K = clf.s.n_classes
        psis = self._psis(None)
        stats = clf.empty_stats()
        used = np.zeros(K, dtype=np.int64)
        seen = 0
        parts: list[Assignment] = []
        for idx, X, C0 in batches:
            idx = np.asarray(idx)
            C = C0 * clf.xp.asarray(self.alpha[idx])[:, None]
            e = clf.expectation(X, C, psis, 1.0)
            seen += idx.size
            quota = None
            if sch.max_per_class is not None:
                quota = np.minimum(sch.max_per_class, math.ceil(sch.max_per_class * seen / self.N)) - used
            _, hard, pc, _ = self._assign(e, quota, None, False)
            used += np.bincount(hard, minlength=K)
            clf.accumulate(stats, X, C, clf.xp.asarray(pc), e, idx % 2, psis)
            parts.append(self._record(idx, e, hard, pc, X, C0, psis))
        clf.blend(stats, 1.0, 1.0)
        moves = clf.maximize()
        out = Assignment(*(np.concatenate([getattr(a, f) for a in parts])
                           for f in Assignment.__dataclass_fields__))
        _recentre(out, to_host(moves))
        return out


def _recentre(a: Assignment, moves: np.ndarray) -> None:
    """Shifts relative to classes whose content moved by ``moves`` (K, 2): t - M(psi) m."""
    from kernels.rotations import inplane_matrices

    M = inplane_matrices(a.psi)  # (B, 2, 2)
    a.shift = a.shift - np.einsum("bij,bj->bi", M, moves[a.cls])
