"""3D pose search shared by ab-initio, heterogeneous and homogeneous refinement
(algorithms.md §1.7-§1.9, §12.1-§12.2).

Particles X (B, nF) are band coefficients of the working box for a ``Band`` (0 < |k| <= r_max),
ctf (B, nF) (times the per-particle scale if used), inv_sigma2 (nF,) the noise weights
INCLUDING the band's 0.5 on the kx == 0 column (as in ``kernels.scoring``). Hypotheses
h = (class k, rotation A, shift t) are scored by the logit

    l_h = -diff2_h / temperature + log p(t) [+ log p(A) for local searches],
    diff2_h = 0.5 sum_f w |X e^{+2 pi i k.t/D} - C P_A V_k|^2      (sub-band of the level)

Shifts are in pixels, the particle content moved by +t (``kernels.fourier.shift_phase``).

``global_search`` (coarse-to-fine, §1.9 [I] default): level 0 scores every rotation of the
HEALPix grid of order ``order0`` against a circular shift grid (streamed in reference chunks
through ``kernels.scoring.stream``). Per particle and class, rotations are ranked by their
best logit over shifts and up to ``max_keep`` survive if within Delta = delta_nats +
bound_factor * E_next / temperature of the best, the ``min_keep`` best always. E_next =
0.5 sum over the shells added at the next level of w C^2 S_k(r), S_k(r) the mean |V_k|^2 on
shell r: the rotation average of |C P V|^2 / (2 sigma2), standing in for the mean over the
candidates [I]. The rank floor matters: on §5.4 A6 data (D = 32, r = 12, 15 -> 7.5 deg) the
parent of the exhaustive argmax was up to 45 nats below the best but never ranked beyond 18
(99th percentile 9), hence min_keep = 16. Level l+1 scores, per particle, the product of the
union of the 8 ``so3_children`` of the survivors and the union of their best shifts +- one
step of the level (shift steps halve over the last levels, so the lattice stays that of the
final step); the band limit rises linearly from ``r_start`` to r_max (cryoDRGN-like L
rising). The last level keeps the ``max_keep`` best (A, t) pairs as the pose set.
Starting at order 1 (30 deg) lost 2-5% of particles in tests; order0 >= 2 is advised.
``exhaustive_search`` scores one grid order
completely; ``local_search`` scores a rotation-vector lattice within n_sigma sigma of given
poses with a Gaussian prior. All particle batches are sized from
``kernels.backend.memory_budget_bytes``; no full score tensor is ever formed.

Results keep a class axis (K = 1 for one volume) and live on the particles' array module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.backend import batch_size_for, batch_slices, host_threads, map_batches, to_host, xp_of
from kernels.fourier import Band, freqs_3d, radial_average
from kernels.grids import shift_grid, so3_children, so3_grid, so3_grid_angles
from kernels.posterior import ArgMax, Logits, LogSumExp, TopK, significant
from kernels.projection import VolumeFT, project
from kernels.reconstruction import Accumulator3D, backproject
from kernels.rotations import euler_to_matrix, rotvec_to_matrix
from kernels.scoring import particle_phases, prepare_particles, stream

_SENTINEL = np.iinfo(np.int64).max


@dataclass(frozen=True)
class KeepPolicy:
    """Survivors per particle and class between levels: the ``max_keep`` best rotations whose
    logit is >= best - (delta_nats + bound_factor * E_next / temperature); the ``min_keep``
    best are always kept. ``delta_nats = inf`` gives plain top-``max_keep`` (cryoDRGN)."""

    max_keep: int = 64
    min_keep: int = 16
    delta_nats: float = 10.0
    bound_factor: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_keep <= self.max_keep:
            raise ValueError(f"need 1 <= min_keep <= max_keep, got {self.min_keep}, {self.max_keep}")


@dataclass(frozen=True)
class Level:
    """One level of the coarse-to-fine search: HEALPix order, band limit (px), shift step (px)."""

    order: int
    r_max: float
    shift_step: float


@dataclass(frozen=True)
class PoseSet:
    """Best hypotheses of the last level per particle and class, for marginalisation.

    R (B, K, S, 3, 3) float64; shifts (B, K, S, 2) px; logits (B, K, S) float32 sorted
    descending, -inf on unused slots; lse (B, K) float64 log-sum-exp of the logits of ALL
    hypotheses scored at the last level (class evidence, ``posterior.class_posteriors``).
    """

    R: Any
    shifts: Any
    logits: Any
    lse: Any


@dataclass(frozen=True)
class SearchResult:
    """Best pose per particle and class: R (B, K, 3, 3) float64, shifts (B, K, 2) px float64,
    score (B, K) float32 best logit (= -diff2 without priors at temperature 1), grid_index
    (B, K) int64 into ``so3_grid(order)`` (-1 for local searches), order the final HEALPix
    order (-1 for local searches), poses the pruned set (or None)."""

    R: Any
    shifts: Any
    score: Any
    grid_index: Any
    order: int
    poses: PoseSet | None = None


def search_levels(
    order0: int, n_levels: int, r_start: float, r_max: float, shift_step0: float, shift_step: float
) -> list[Level]:
    """Level schedule: orders order0 .. order0+n_levels-1, band limit rising linearly from
    r_start to r_max, shift step halving from shift_step0 to shift_step over the last levels
    (shift_step0 / shift_step must be a power of two 2^j with j <= n_levels - 1)."""
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    ratio = shift_step0 / shift_step
    j = round(math.log2(ratio)) if ratio >= 1 else -1
    if j < 0 or not math.isclose(2.0**j, ratio, rel_tol=1e-9) or j > n_levels - 1:
        raise ValueError(
            f"shift_step0 / shift_step = {ratio} must be 2^j with 0 <= j <= n_levels - 1 = {n_levels - 1}"
        )
    if not 0 < r_start <= r_max:
        raise ValueError(f"need 0 < r_start <= r_max, got {r_start}, {r_max}")
    levels = []
    for lev in range(n_levels):
        frac = lev / (n_levels - 1) if n_levels > 1 else 1.0
        halvings = max(0, lev - (n_levels - 1 - j))
        levels.append(Level(order0 + lev, r_start + (r_max - r_start) * frac, shift_step0 / 2**halvings))
    return levels


def shell_power(vft: VolumeFT) -> np.ndarray:
    """Mean |V|^2 per shell r = round(|kappa| / pad) of a padded volume FT -> (D//2,) float64 (host)."""
    xp = xp_of(vft.data)
    kz, ky, kx = freqs_3d(vft.pad * vft.D, xp)
    shells = xp.rint(xp.sqrt((kx**2 + ky**2 + kz**2).astype(xp.float64)) / vft.pad).astype(xp.int64)
    power = vft.data.real.astype(xp.float64) ** 2 + vft.data.imag.astype(xp.float64) ** 2
    return to_host(radial_average(power, shells, vft.D // 2))


# ---------------------------------------------------------------- internal building blocks


@dataclass(frozen=True)
class _Batch:
    """One particle batch on the band of the search: X (B, nF), C (B, nF), w (nF,) on xp."""

    X: Any
    C: Any
    w: Any
    band: Band

    def sub(self, r_max: float) -> _Batch:
        """The same particles on the sub-band |k| <= r_max."""
        if r_max >= self.band.r_max:
            return self
        sub = Band(self.band.D, r_max, self.band.r_min)
        cols = np.searchsorted(self.band.idx, sub.idx)
        c = xp_of(self.X).asarray(cols)
        return _Batch(self.X[:, c], self.C[:, c], self.w[c], sub)


def _volumes(volumes: VolumeFT | Sequence[VolumeFT]) -> list[VolumeFT]:
    return [volumes] if isinstance(volumes, VolumeFT) else list(volumes)


def _prepare(X: Any, ctf: Any, inv_sigma2: Any, band: Band, centres: Any) -> tuple[Any, Any, Any]:
    """X undone by the per-particle window centres (B, 2) px (or None), ctf (ones if None), w."""
    xp = xp_of(X)
    X = xp.asarray(X)
    if centres is not None:
        X = (X * particle_phases(band, xp.asarray(centres, dtype=xp.float64), xp)).astype(X.dtype)
    C = xp.ones(X.shape, dtype=xp.float32) if ctf is None else xp.asarray(ctf, dtype=xp.float32)
    return X, C, xp.asarray(inv_sigma2, dtype=xp.float32)


def _shift_log_prior(shifts_px: np.ndarray, sigma: float | None) -> np.ndarray | None:
    """Gaussian log prior -|t|^2 / (2 sigma^2) of shifts relative to the window centre."""
    if sigma is None:
        return None
    return -(shifts_px**2).sum(axis=-1) / (2.0 * sigma**2)


def _unique_rows(a: np.ndarray) -> np.ndarray:
    """Sorted unique non-negative entries per row of an int64 array (B, n) (-1 = none),
    padded with -1 to the longest row -> (B, m)."""
    s = np.sort(a, axis=1)
    dup = np.zeros(s.shape, dtype=bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    s = np.sort(np.where(dup | (s < 0), _SENTINEL, s), axis=1)
    m = max(int((s != _SENTINEL).sum(axis=1).max()), 1)
    s = s[:, :m]
    s[s == _SENTINEL] = -1
    return s


def _project_sets(vft: VolumeFT, R_unique: Any, inverse: np.ndarray, band: Band) -> Any:
    """References (B, S, nF) = project(vft, R_unique[inverse]); zeros where inverse < 0."""
    xp = xp_of(vft.data)
    P = project(vft, xp.asarray(R_unique), band)
    inv = xp.asarray(np.maximum(inverse, 0))
    out = P[inv]
    out[xp.asarray(inverse < 0)] = 0
    return out


#: Particles per block of ``_score_sets`` on NumPy (its float64 squares of a whole batch were 5x
#: slower than in blocks of 4: 150 particles x 256 references x 200 pixels, one thread).
_SCORE_ROWS = 4


def _score_sets(batch: _Batch, shifts_px: np.ndarray, P: Any) -> Any:
    """diff2 (B, T, S) float32 of each particle against its own shifts (B, T, 2) px and its own
    references P (B, S, nF): the batched form of ``scoring.diff2_chunk``."""
    xp = xp_of(batch.X)
    B, T = shifts_px.shape[:2]
    nF = batch.band.n
    ph = particle_phases(batch.band, xp.asarray(shifts_px.reshape(-1, 2)), xp).reshape(B, T, nF)
    rows = (batch.X[:, None, :] * ph).reshape(B * T, nF)
    parts = prepare_particles(rows, xp.repeat(batch.C, T, axis=0), batch.w, xp.ones((1, nF), xp.complex64))
    S = P.shape[1]
    Y, ctf2w = parts.Y.reshape(B, T, 2 * nF), parts.ctf2w[::T]
    d = xp.empty((B, T, S), dtype=xp.float32)
    norm = xp.empty((B, S))
    step = max(B, 1) if xp is not np else _SCORE_ROWS  # per-particle products: blocks of a few stay in cache
    for b in range(0, B, step):
        blk = slice(b, b + step)
        p = P[blk]
        neg = xp.empty((p.shape[0], S, 2 * nF), dtype=xp.float32)
        xp.negative(p.real, out=neg[..., :nF])
        xp.negative(p.imag, out=neg[..., nF:])
        xp.matmul(Y[blk], neg.transpose(0, 2, 1), out=d[blk])
        sq = xp.square(neg, dtype=xp.float64)
        sq = sq[..., :nF] + sq[..., nF:]
        norm[blk] = xp.matmul(ctf2w[blk, None, :], sq.transpose(0, 2, 1))[:, 0, :]
    d += (parts.half_norm[::T][:, None] + 0.5 * norm).astype(xp.float32)[:, None, :]
    return d


def _score_candidates(batch: _Batch, vft: VolumeFT, R_unique: Any, rot_inverse: np.ndarray,
                      shifts_px: np.ndarray, shift_valid: np.ndarray) -> Any:
    """diff2 (B, T, S) of per-particle candidate sets: rotations R_unique[rot_inverse] (B, S)
    x shifts (B, T, 2) px; +inf on padding (rot_inverse < 0 or not shift_valid)."""
    xp = xp_of(batch.X)
    P = _project_sets(vft, R_unique, rot_inverse, batch.band)
    d = _score_sets(batch, shifts_px, P)
    invalid = ~shift_valid[:, :, None] | (rot_inverse < 0)[:, None, :]
    d[xp.asarray(invalid)] = np.inf
    return d


class _TopRotations:
    """Reducer: the k best references per particle ranked by their best logit over shifts:
    ``values`` (B, k) float32 descending (-inf where fewer than k), ``ref`` (B, k) reference
    indices, ``shift`` (B, k) index of the best shift of each. Ranking distinct rotations
    (not (A, t) pairs) keeps neighbouring shifts of one rotation from filling the slots."""

    def __init__(self, k: int, logits: Logits) -> None:
        self.k, self.logits = k, logits
        self.values: Any = None

    def update(self, diff2: Any, r0: int) -> None:
        xp = xp_of(diff2)
        B, _, rc = diff2.shape
        l = self.logits(diff2, r0)
        v = l.max(axis=1)
        r = xp.broadcast_to(r0 + xp.arange(rc), (B, rc))
        n_old = 0
        if self.values is not None:
            n_old = self.values.shape[1]
            v = xp.concatenate([self.values, v], axis=1)
            r = xp.concatenate([self.ref, r], axis=1)
        k = min(self.k, v.shape[1])
        part = xp.argpartition(-v, k - 1, axis=1)[:, :k] if v.shape[1] > k else xp.broadcast_to(
            xp.arange(k), (B, k))
        order = xp.argsort(-xp.take_along_axis(v, part, axis=1), axis=1)
        part = xp.take_along_axis(part, order, axis=1)
        # the best shift only of the kept references of this chunk: an argmax over the shift axis
        # of the whole chunk (B, T, rc) took a fifth of an ab-initio iteration on NumPy
        new = part >= n_old
        cols = xp.where(new, part - n_old, 0)
        t = xp.take_along_axis(l, cols[:, None, :], axis=2).argmax(axis=1)
        if n_old:
            t = xp.where(new, t, xp.take_along_axis(self.shift, xp.where(new, 0, part), axis=1))
        self.values, self.ref = (xp.take_along_axis(a, part, axis=1) for a in (v, r))
        self.shift = t


def _shift_children(units: np.ndarray, keep: np.ndarray, step: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Union per particle of kept lattice shifts (B, n, 2) (units of the final step) and
    their 8 neighbours at ``step`` units, inside the disc of ``radius`` units.
    Returns (B, T, 2) units and a validity mask (B, T)."""
    off = step * np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij"), axis=-1).reshape(-1, 2)
    c = units[:, :, None, :] + off[None, None, :, :]  # (B, n, 9, 2)
    inside = (c**2).sum(axis=-1) <= radius**2 * (1 + 1e-9) + 1e-12
    ok = inside & keep[:, :, None]
    span = int(math.floor(radius + 1e-9)) + step + 1
    width = 2 * span + 1
    code = np.where(ok, (c[..., 0] + span) * width + (c[..., 1] + span), -1).reshape(len(c), -1)
    u = _unique_rows(code)
    valid = u >= 0
    dec = np.stack([u // width - span, u % width - span], axis=-1)
    return np.where(valid[..., None], dec, 0), valid


def _batch_size(n: int, per_particle: int, batch_size: int | None, xp: Any) -> int:
    """Particles per batch: given, or a quarter of the memory budget, on NumPy shared by the
    threads of ``map_batches`` (each holds one batch)."""
    if batch_size is not None:
        return max(1, min(int(batch_size), n))
    share = 0.25 / (host_threads() if xp is np else 1)
    return batch_size_for(max(per_particle, 1), fraction=share, minimum=1, maximum=max(n, 1))


def _fine_bytes(nF: int, n_rot: int, n_shift: int) -> int:
    """Bytes per particle of one fine level: references, their squares, rows and scores."""
    return n_rot * nF * 32 + n_shift * nF * 40 + n_shift * n_rot * 16


def _result(xp: Any, R: np.ndarray, shifts: np.ndarray, score: np.ndarray, index: np.ndarray,
            order: int, poses: PoseSet | None) -> SearchResult:
    return SearchResult(
        R=xp.asarray(R), shifts=xp.asarray(shifts), score=xp.asarray(score, dtype=xp.float32),
        grid_index=xp.asarray(index), order=order, poses=poses,
    )


class _Collector:
    """Host-side assembly of per-batch, per-class results into (N, K, ...) arrays."""

    def __init__(self, n: int, K: int, keep: int, with_poses: bool) -> None:
        self.R = np.zeros((n, K, 3, 3))
        self.shifts = np.zeros((n, K, 2))
        self.score = np.full((n, K), -np.inf, dtype=np.float32)
        self.index = np.full((n, K), -1, dtype=np.int64)
        self.with_poses = with_poses
        if with_poses:
            self.pR = np.zeros((n, K, keep, 3, 3))
            self.pt = np.zeros((n, K, keep, 2))
            self.pl = np.full((n, K, keep), -np.inf, dtype=np.float32)
            self.lse = np.full((n, K), -np.inf)

    def put(self, sl: slice, k: int, R: np.ndarray, shifts: np.ndarray, logits: np.ndarray,
            index: np.ndarray, lse: Any) -> None:
        """R (B, s, 3, 3), shifts (B, s, 2), logits (B, s) descending, index (B, s), lse (B,)."""
        self.R[sl, k], self.shifts[sl, k] = R[:, 0], shifts[:, 0]
        self.score[sl, k], self.index[sl, k] = logits[:, 0], index[:, 0]
        if self.with_poses:
            s = logits.shape[1]
            self.pR[sl, k, :s], self.pt[sl, k, :s], self.pl[sl, k, :s] = R, shifts, logits
            self.lse[sl, k] = to_host(lse)

    def result(self, xp: Any, order: int) -> SearchResult:
        poses = None
        if self.with_poses:
            poses = PoseSet(xp.asarray(self.pR), xp.asarray(self.pt), xp.asarray(self.pl), xp.asarray(self.lse))
        return _result(xp, self.R, self.shifts, self.score, self.index, order, poses)


# ---------------------------------------------------------------- public searches


def exhaustive_search(
    X: Any,
    ctf: Any,
    inv_sigma2: Any,
    band: Band,
    volumes: VolumeFT | Sequence[VolumeFT],
    order: int,
    shift_extent: float,
    shift_step: float,
    *,
    temperature: float = 1.0,
    shift_sigma: float | None = None,
    centres: Any = None,
    batch_size: int | None = None,
    chunk: int | None = None,
) -> SearchResult:
    """Best (A, t) per particle and class over ALL of ``so3_grid(order)`` x
    ``shift_grid(shift_extent, shift_step)`` (around ``centres`` (B, 2) px if given), on the
    whole band. The reference the coarse-to-fine search is tested against (§5.4 A6)."""
    xp = xp_of(X)
    vfts = _volumes(volumes)
    X, C, w = _prepare(X, ctf, inv_sigma2, band, centres)
    n = X.shape[0]
    grid = xp.asarray(so3_grid(order))
    shifts = shift_grid(shift_extent, shift_step)
    logits = Logits(temperature, _shift_log_prior(shifts, shift_sigma))
    phases = particle_phases(band, xp.asarray(shifts), xp)
    R = np.zeros((n, len(vfts), 3, 3))
    t = np.zeros((n, len(vfts), 2))
    score = np.zeros((n, len(vfts)), dtype=np.float32)
    index = np.zeros((n, len(vfts)), dtype=np.int64)
    step = _batch_size(n, len(shifts) * band.n * 24, batch_size, xp)
    def one(sl: slice) -> None:
        parts = prepare_particles(X[sl], C[sl], w, phases)
        for k, vft in enumerate(vfts):
            best = ArgMax(logits)
            stream(parts, lambda r0, r1, v=vft: project(v, grid[r0:r1], band), [best],
                   n_refs=len(grid), chunk=chunk)
            ref, sh = to_host(best.ref), to_host(best.shift)
            R[sl, k], t[sl, k] = to_host(grid[xp.asarray(ref)]), shifts[sh]
            score[sl, k], index[sl, k] = to_host(best.score), ref
    map_batches(one, batch_slices(n, step, xp), xp)
    if centres is not None:
        t += to_host(centres)[:, None, :]
    return _result(xp, R, t, score, index, order, None)


def global_search(
    X: Any,
    ctf: Any,
    inv_sigma2: Any,
    band: Band,
    volumes: VolumeFT | Sequence[VolumeFT],
    *,
    order0: int = 2,
    n_levels: int = 3,
    r_start: float | None = None,
    shift_extent: float = 6.0,
    shift_step0: float = 2.0,
    shift_step: float = 0.5,
    keep: KeepPolicy | None = None,
    temperature: float = 1.0,
    shift_sigma: float | None = None,
    centres: Any = None,
    return_poses: bool = False,
    batch_size: int | None = None,
    chunk: int | None = None,
) -> SearchResult:
    """Coarse-to-fine search over SO(3) x shifts for every particle and class (see module doc).

    X, ctf (or None) (B, nF), inv_sigma2 (nF,) on ``band``; volumes one or K ``VolumeFT``.
    Levels from ``search_levels(order0, n_levels, r_start (default min(12, r_max)), band.r_max,
    shift_step0, shift_step)``; shifts within the disc of ``shift_extent`` px around
    ``centres`` (B, 2) px (default 0) with an optional Gaussian prior of ``shift_sigma`` px.
    ``return_poses`` adds the last level's best ``keep.max_keep`` hypotheses with logits.
    ``batch_size`` (particles) defaults from the memory budget, ``chunk`` (references of the
    first level) from ``scoring.ref_chunk_size``.
    """
    xp = xp_of(X)
    keep = KeepPolicy() if keep is None else keep
    vfts = _volumes(volumes)
    r0 = min(12.0, band.r_max) if r_start is None else r_start
    levels = search_levels(order0, n_levels, r0, band.r_max, shift_step0, shift_step)
    X, C, w = _prepare(X, ctf, inv_sigma2, band, centres)
    n = X.shape[0]
    powers = [shell_power(v) for v in vfts]
    grid0 = xp.asarray(so3_grid(order0))
    shifts0 = shift_grid(shift_extent, shift_step0)
    units0 = np.rint(shifts0 / shift_step).astype(np.int64)
    radius = shift_extent / shift_step
    n_disc = len(shift_grid(shift_extent, shift_step))
    per = max(
        [len(shifts0) * Band(band.D, levels[0].r_max).n * 24]
        + [_fine_bytes(Band(band.D, lv.r_max).n, 8 * keep.max_keep, min(n_disc, 9 * keep.max_keep))
           for lv in levels[1:]]
    )
    step = _batch_size(n, per, batch_size, xp)
    angles = [so3_grid_angles(lv.order) for lv in levels]
    out = _Collector(n, len(vfts), keep.max_keep, return_poses)
    lev0 = levels[0]
    logits0 = Logits(temperature, _shift_log_prior(shifts0, shift_sigma))
    def one(sl: slice) -> None:
        full = _Batch(X[sl], C[sl], w, band)
        batch0 = full.sub(lev0.r_max)
        parts = prepare_particles(batch0.X, batch0.C, batch0.w, particle_phases(batch0.band, xp.asarray(shifts0), xp))
        for k, vft in enumerate(vfts):
            top = _reducer(keep.max_keep, logits0, n_levels == 1)
            lse = LogSumExp(logits0) if n_levels == 1 and return_poses else None
            stream(parts, lambda a, b, v=vft, bd=batch0.band: project(v, grid0[a:b], bd),
                   [top] if lse is None else [top, lse], n_refs=len(grid0), chunk=chunk)
            values, rot, units = to_host(top.values), to_host(top.ref), units0[to_host(top.shift)]
            for lev in range(1, n_levels):
                prev, cur, last = levels[lev - 1], levels[lev], lev == n_levels - 1
                kept = _keep_mask(values, full, powers[k], prev.r_max, cur.r_max, keep, temperature)
                rot_sets, rot_inverse, uniq = _rotation_children(prev.order, rot, kept)
                units_c, valid_t = _shift_children(units, kept, round(cur.shift_step / shift_step), radius)
                shifts_px = units_c * shift_step
                R_u = euler_to_matrix(*(a[uniq] for a in angles[lev]))
                d = _score_candidates(full.sub(cur.r_max), vft, R_u, rot_inverse, shifts_px, valid_t)
                logits = Logits(temperature, _shift_log_prior(shifts_px, shift_sigma))
                top = _reducer(keep.max_keep, logits, last)
                top.update(d, 0)
                if last and return_poses:
                    lse = LogSumExp(logits)
                    lse.update(d, 0)
                values = to_host(top.values)
                rot = np.take_along_axis(rot_sets, to_host(top.ref), axis=1)
                units = np.take_along_axis(units_c, to_host(top.shift)[..., None], axis=1)
            rot_idx = np.where(np.isfinite(values), rot, 0)
            a = angles[-1]
            Rk = euler_to_matrix(a[0][rot_idx], a[1][rot_idx], a[2][rot_idx]).reshape(*rot.shape, 3, 3)
            out.put(sl, k, Rk, units * shift_step, values, rot_idx, None if lse is None else lse.lse)
    map_batches(one, batch_slices(n, step, xp), xp)
    res = out.result(xp, levels[-1].order)
    if centres is None:
        return res
    return _recentre(res, xp.asarray(centres, dtype=xp.float64))


def _reducer(k: int, logits: Logits, last: bool) -> Any:
    """Last level: the k best (A, t) pairs (the pose set); earlier levels: the k best rotations."""
    return TopK(k, logits) if last else _TopRotations(k, logits)


def _rotation_children(order: int, rot: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per particle the union of the ``so3_children`` of the kept grid indices rot (B, n) of
    order ``order``: sets (B, S) (-1 padded), their index into the batch-unique children
    (B, S) (-1 padded) and the unique children (U,) (indices into the order+1 grid)."""
    children = so3_children(order, np.where(kept, rot, 0).ravel()).reshape(len(rot), -1)
    children[~np.repeat(kept, 8, axis=1)] = -1
    sets = _unique_rows(children)
    uniq, inverse = np.unique(sets[sets >= 0], return_inverse=True)
    rot_inverse = np.full(sets.shape, -1, dtype=np.int64)
    rot_inverse[sets >= 0] = inverse
    return sets, rot_inverse, uniq


def _keep_mask(values: np.ndarray, full: _Batch, power: np.ndarray, r_now: float, r_next: float,
               keep: KeepPolicy, temperature: float) -> np.ndarray:
    """Survivor mask (B, k) of descending logits ``values`` under the adaptive threshold."""
    xp = xp_of(full.X)
    shell = full.band.shell
    ann = np.flatnonzero((shell > r_now) & (shell <= r_next))
    if ann.size:
        c = xp.asarray(ann)
        s = xp.asarray(power[shell[ann]])
        e_next = to_host(0.5 * ((full.C[:, c].astype(xp.float64) ** 2) * (full.w[c] * s)).sum(axis=1))
    else:
        e_next = np.zeros(values.shape[0])
    delta = keep.delta_nats + keep.bound_factor * e_next / temperature
    rank = np.arange(values.shape[1])[None, :]
    within = values >= (values[:, :1] - delta[:, None])
    return np.isfinite(values) & (within | (rank < keep.min_keep))


def _recentre(res: SearchResult, centres: Any) -> SearchResult:
    poses = res.poses
    if poses is not None:
        poses = PoseSet(poses.R, poses.shifts + centres[:, None, None, :], poses.logits, poses.lse)
    return SearchResult(res.R, res.shifts + centres[:, None, :], res.score, res.grid_index, res.order, poses)


def local_lattice(sigma_deg: float, step_deg: float, n_sigma: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Rotation perturbations exp([omega]) for omega on a cubic lattice of ``step_deg`` within
    n_sigma * sigma_deg -> (L, 3, 3) and their Gaussian log prior -|omega|^2 / (2 sigma^2) (L,)."""
    m = int(math.floor(n_sigma * sigma_deg / step_deg + 1e-9))
    g = np.arange(-m, m + 1) * step_deg
    om = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    om = om[(om**2).sum(axis=1) <= (n_sigma * sigma_deg) ** 2 * (1 + 1e-9)]
    return rotvec_to_matrix(np.deg2rad(om)), -(om**2).sum(axis=1) / (2.0 * sigma_deg**2)


def local_search(
    X: Any,
    ctf: Any,
    inv_sigma2: Any,
    band: Band,
    volumes: VolumeFT | Sequence[VolumeFT],
    R0: Any,
    shifts0: Any,
    *,
    sigma_deg: float,
    step_deg: float,
    shift_sigma: float,
    shift_step: float,
    n_sigma: float = 3.0,
    temperature: float = 1.0,
    max_keep: int = 64,
    return_poses: bool = False,
    batch_size: int | None = None,
) -> SearchResult:
    """Search around given poses R0 (B, 3, 3) and shifts0 (B, 2) px (RELION local searches):
    rotations exp([omega]) R0 with omega on a ``step_deg`` lattice within n_sigma * sigma_deg,
    shifts on a ``shift_step`` lattice within n_sigma * shift_sigma of shifts0, with Gaussian
    priors of sigma_deg and shift_sigma. Same result layout as ``global_search``."""
    xp = xp_of(X)
    vfts = _volumes(volumes)
    X, C, w = _prepare(X, ctf, inv_sigma2, band, shifts0)
    n = X.shape[0]
    dR, lp_rot = local_lattice(sigma_deg, step_deg, n_sigma)
    shifts = shift_grid(n_sigma * shift_sigma, shift_step)
    lp_t = _shift_log_prior(shifts, shift_sigma)
    R0 = to_host(R0).reshape(-1, 3, 3)
    L, T = len(dR), len(shifts)
    step = _batch_size(n, _fine_bytes(band.n, L, T), batch_size, xp)
    out = _Collector(n, len(vfts), max_keep, return_poses)
    def one(sl: slice) -> None:
        B = sl.stop - sl.start
        batch = _Batch(X[sl], C[sl], w, band)
        R_all = np.einsum("lij,bjk->blik", dR, R0[sl])
        inverse = np.arange(B * L).reshape(B, L)
        shifts_px = np.broadcast_to(shifts, (B, T, 2))
        logits = Logits(temperature, np.broadcast_to(lp_t, (B, T)), np.broadcast_to(lp_rot, (B, L)))
        for k, vft in enumerate(vfts):
            d = _score_candidates(batch, vft, R_all.reshape(-1, 3, 3), inverse, shifts_px, np.ones((B, T), bool))
            top = TopK(max_keep, logits)
            top.update(d, 0)
            lse = None
            if return_poses:
                lse = LogSumExp(logits)
                lse.update(d, 0)
            values, slot_r, slot_t = to_host(top.values), to_host(top.ref), to_host(top.shift)
            Rk = np.take_along_axis(R_all, np.maximum(slot_r, 0)[..., None, None], axis=1)
            out.put(sl, k, Rk, shifts[np.maximum(slot_t, 0)], values, np.full(values.shape, -1),
                    None if lse is None else lse.lse)
    map_batches(one, batch_slices(n, step, xp), xp)
    return _recentre(out.result(xp, -1), xp.asarray(shifts0, dtype=xp.float64))


# ---------------------------------------------------------------- results -> reconstruction


def pose_weights(poses: PoseSet, fraction: float = 0.999) -> Any:
    """Posterior weights (B, K, S) over the pose set: RELION significant weights (the smallest
    leading set holding ``fraction`` of the posterior mass, ``posterior.significant``),
    renormalised to sum to 1 per particle and class (0 elsewhere)."""
    xp = xp_of(poses.logits)
    B, K, S = poses.logits.shape
    vals = poses.logits.reshape(B * K, S)
    lse = poses.lse.reshape(B * K)
    mask = significant(vals, lse, fraction)
    g = xp.where(mask, xp.exp(vals.astype(xp.float64) - xp.asarray(lse, dtype=xp.float64)[:, None]), 0.0)
    tot = g.sum(axis=1, keepdims=True)
    return (g / xp.where(tot > 0, tot, 1.0)).reshape(B, K, S)


def _class_weights(xp: Any, class_weights: Any, B: int, K: int) -> Any:
    if class_weights is None:
        return xp.ones((B, K), dtype=xp.float64)
    return xp.asarray(class_weights, dtype=xp.float64).reshape(B, K)


def _insertion_weights(xp: Any, noise_weights: Any, rows: Any, p: Any) -> Any:
    """Per-insertion weights: pose/class weight p (N,) times the optional 1/sigma2 (nF,) or
    (B, nF) (then taken at ``rows``)."""
    if noise_weights is None:
        return p
    nw = xp.asarray(noise_weights, dtype=xp.float64)
    return p[:, None] * (nw[None, :] if nw.ndim == 1 else nw[rows])


def insert_best(
    accs: Sequence[Accumulator3D],
    X: Any,
    ctf: Any,
    result: SearchResult,
    band: Band,
    *,
    class_weights: Any = None,
    noise_weights: Any = None,
) -> None:
    """Back-project every particle at its best pose of each class k into ``accs[k]``, weighted
    by ``class_weights`` (B, K) (default 1; zero weights skipped) and optional noise weights
    1/sigma2 WITHOUT the band's kx == 0 factor (``backproject`` adds it), (nF,) or (B, nF)."""
    xp = xp_of(X)
    B, K = result.score.shape
    cw = _class_weights(xp, class_weights, B, K)
    for k in range(K):
        sel = xp.flatnonzero(cw[:, k] > 0)
        if sel.size == 0:
            continue
        backproject(accs[k], xp.asarray(X)[sel], result.R[sel, k], band,
                    ctf=None if ctf is None else xp.asarray(ctf)[sel], shifts=result.shifts[sel, k],
                    weights=_insertion_weights(xp, noise_weights, sel, cw[sel, k]))


def insert_marginal(
    accs: Sequence[Accumulator3D],
    X: Any,
    ctf: Any,
    poses: PoseSet,
    band: Band,
    *,
    class_weights: Any = None,
    noise_weights: Any = None,
    fraction: float = 0.999,
) -> None:
    """Back-project every significant hypothesis (A, t) of the pose set of class k into
    ``accs[k]`` with weight class_weight * gamma (``pose_weights``): the marginalised M-step
    over the pruned set (each particle contributes total weight class_weight per class)."""
    xp = xp_of(X)
    gamma = pose_weights(poses, fraction) * _class_weights(xp, class_weights, *poses.lse.shape)[:, :, None]
    X = xp.asarray(X)
    for k in range(gamma.shape[1]):
        b, s = xp.nonzero(gamma[:, k] > 0)
        if b.size == 0:
            continue
        backproject(accs[k], X[b], poses.R[b, k, s], band,
                    ctf=None if ctf is None else xp.asarray(ctf)[b], shifts=poses.shifts[b, k, s],
                    weights=_insertion_weights(xp, noise_weights, b, gamma[b, k, s]))
