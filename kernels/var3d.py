"""3D variability analysis (algorithms.md §9.2; cryoSPARC 3DVA, Punjani & Fleet 2021): probabilistic
PCA by EM with a fixed projection operator per particle.

Model: X_i e^{+2 pi i f.t_i/D} = alpha_i C_i P_{R_i} (V0 + sum_k z_ik V_k) + N_i, z_i ~ N(0, I_K), N_i
with variance sigma2(r) per real component. Poses (R_i, t_i px), CTFs, alpha_i, sigma2 and V0 are
fixed. With r_i = X_i e^{..} - alpha_i C_i P_i V0, W_i = [alpha_i C_i P_i V_k]_k and
<a, b> = Re sum_f w_f conj(a) b / sigma2 over the band 0 < r <= r_max (w_f: 0.5 on the kx = 0
column; the band is not cut at the filter resolutions [I]: the filters act on the components,
which then hold nothing the E-step could see outside them):

  E-step  A_i = I + G_i, G_i[k, l] = <W_ik, W_il>, mu_i = A_i^{-1} b_i, b_i[k] = <W_ik, r_i>;
          E[z z^T] = A_i^{-1} + mu mu^T; log-likelihood gain over V0 alone (b.mu - log det A_i) / 2
          (with pose freedom: of the latents and the pose corrections together).
  M-step  per padded Fourier voxel (slice-insertion approximation of sum_i P_i^T C_i^2 P_i):
          (G(kappa) + lambda'(kappa) I) V(kappa) = H(kappa), G = sum_i E[z_i z_i^T] w_i(kappa),
          H_k = sum_i mu_ik c_i(kappa), w_i / c_i the back-projected alpha^2 C^2 / sigma2 and
          alpha C r_i / sigma2; lambda' = lambda x shell mean of trace(G) / K.
  post    inverse FFT and gridding correction, x mask M, Butterworth low-pass
          1 / sqrt(1 + (s / s_f)^(2 order)) and optional high-pass 1 - 1 / sqrt(1 + (s / s_hp)^16),
          Gram-Schmidt in <a, b>_M = sum_x M a b (Cholesky of the Gram matrix), rotation to a
          diagonal latent covariance S' = mean_i E[z'_i z'_i^T] sorted descending. The stored
          components are sqrt(lambda_k) Q_k with Q_k of unit masked norm (parameter expansion: the
          prior N(0, I) stays matched to the latent second moments, which speeds up EM).

Pose freedom [I] (``pose_sd_deg``, ``shift_sd_px`` > 0; cryoSPARC has no such option): the E-step
also fits small per-particle rotations and shifts as nuisance coordinates d_i with prior N(0, I)
in units of those s.d.s, linearised around the given pose: the columns of W_i gain the
derivatives of alpha_i C_i P_i V0 along each rotation axis (finite difference over 0.5 deg) and
shift axis, each x its s.d. The joint Gaussian posterior over (z_i, d_i) is exact; E[z z^T] is
its z block and the M-step fits the components to r_i minus the pose part, H_k from
mu_ik r_i - sum_j E[z_ik d_ij] D_ij. Without it, consensus poses a few degrees off put the
pose-error modes of the whole particle into the top components (test_var3d: 3 deg / 0.3 px
errors: |corr(z, t)| 0.57 with fixed poses (0.42 without oversampling), 0.90 with pose freedom;
the demo's consensus of session 16, before oversampling: 0.712 -> 0.724 at 2 deg / 2 Å).

Oversampling [I] (``oversample`` p, default 2; randomised subspace iteration): the EM carries
K + p components from the random start through the first ``warm_iterations`` = ceil(n_iterations / 2)
iterations and then keeps the K of largest variance. EM from a random start grows each
component into the data's modes at a rate set by how much of them the start holds; a start
nearly orthogonal to the K-th mode leaves that component on a weaker one for many iterations
(demo consensus, K = 3, 8 iterations: seed 0 ended at best |corr(z, t)| 0.31, seeds 1-3 at 0.73;
test_var3d: K = 1, 3 iterations, seed 1 0.25 vs 0.94). The extra components hold such modes
until the K strongest have grown; the converged subspace is the same. The log-likelihood gain
of the warm-up iterations is that of the K + p model (it steps down when the extras go).

``prepare`` reuses ``class3d.Class3D.prepare`` with one class for the fixed quantities: noise
model, consensus V0 (given or reconstructed, scaled to the data), per-particle scale (none / input
/ optimal) and solvent mask (given or thresholded from the consensus). V0 is not masked [I]: with a
focus mask the rest of the particle would stay in every residual. Initial components: white noise
in M, filtered, orthonormal, scaled so that mean_i ||alpha C P V_k||^2 / sigma2 = 1 (§9.2 [I]).
After the iterations ``finalize`` runs one more E-step so that the latents belong to the final maps.

Reported latents z (N, K) and their posterior standard deviations are in units of the unit-norm
components (``components``); ``eigenvalues`` are the latent variances of the last rotation,
``latent_variance()`` = mean_i E[z_ik^2] of the final E-step (§9.2). Memory: K + 1 maps, K(K+1)/2
padded accumulators and a chunk of particles; per particle only alpha and the latents. During the
warm-up K + p replaces K in the maps, accumulators, gathers and scatters (K = 3, p = 2: 15
accumulators instead of 6).
Projections and insertions of a batch share one interpolation stencil (K + 1 gathers and
K (K + 3) / 2 scatters of the same ``kernels.projection.interp_stencil``); pose freedom adds three
stencils (the turned poses) with one gather of V0 each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from kernels import class3d as c3
from kernels.backend import InOrder, batch_slices, map_batches, to_host, xp_of
from kernels.fourier import Band, freqs_3d, irfft3c, rfft3c
from kernels.projection import (
    crop_centred,
    gridding_kernel,
    interp_stencil,
    prepare_volume,
    slice_coords,
    stencil_chunk,
)
from kernels.reconstruction import Accumulator3D, scatter_add
from kernels.refine3d import noise_weights
from kernels.rotations import rotvec_to_matrix
from kernels.scoring import particle_phases

Loader = c3.Loader
Progress = c3.Progress
#: Padding of the projection and insertion grids.
PAD = 2
#: Order of the Butterworth high-pass (§9.1).
HIGHPASS_ORDER = 8.0


@dataclass(frozen=True)
class Settings:
    """Options. D: working box (px), pixel_size Å/px, r_max: band limit (shells); filter_res_A /
    highpass_res_A: Butterworth low-/high-pass of the components (None: off); lambda_reg: the
    "normalised fractional" Tikhonov coefficient; mask_*: ``masks.threshold_mask`` of the
    consensus when no mask is given (px); chunk: particles per loader call; pose_sd_deg (per
    axis) / shift_sd_px: prior s.d.s of the pose freedom (module doc; 0: fixed); oversample:
    extra components during the first ``warm_iterations`` (module doc)."""

    n_components: int
    D: int
    pixel_size: float
    r_max: int
    n_iterations: int = 20
    filter_res_A: float | None = None
    filter_order: float = 1.5
    highpass_res_A: float | None = None
    lambda_reg: float = 0.01
    scale_mode: Literal["none", "input", "optimal"] = "optimal"
    mask_threshold: float = 0.2
    mask_near_px: float = 1.25
    mask_far_px: float = 2.5
    chunk: int = 1000
    pose_sd_deg: float = 0.0
    shift_sd_px: float = 0.0
    oversample: int = 2

    def __post_init__(self) -> None:
        if self.n_iterations < 1 or self.oversample < 0:
            raise ValueError(f"need n_iterations >= 1 and oversample >= 0, got {self.n_iterations}, "
                             f"{self.oversample}")

    @property
    def warm_iterations(self) -> int:
        """Iterations that carry the ``oversample`` extra components (module doc)."""
        return (self.n_iterations + 1) // 2


def component_filter(D: int, pixel_size: float, filter_res_A: float | None, order: float,
                     highpass_res_A: float | None, xp: ModuleType = np) -> Any:
    """Butterworth low-pass x optional high-pass (§9.2 step 2) on the (D, D, D//2+1) half grid, float64."""
    kz, ky, kx = freqs_3d(D, xp)
    s = xp.sqrt((kx**2 + ky**2 + kz**2).astype(xp.float64)) / (D * pixel_size)
    H = xp.ones(s.shape)
    if filter_res_A is not None:
        H = H / xp.sqrt(1.0 + (s * filter_res_A) ** (2.0 * order))
    if highpass_res_A is not None:
        H = H * (1.0 - 1.0 / xp.sqrt(1.0 + (s * highpass_res_A) ** (2.0 * HIGHPASS_ORDER)))
    return H


def masked_gram(maps: Any, mask: Any) -> np.ndarray:
    """Gram matrix (K, K) float64 of maps (K, D, D, D) in the inner product sum_x M a b."""
    xp = xp_of(maps)
    flat = maps.reshape(maps.shape[0], -1).astype(xp.float64)
    return to_host((flat * mask.reshape(1, -1)) @ flat.T)


@dataclass(frozen=True)
class _Stencil:
    """Interpolation stencil of the band pixels of B particles at rotations R on the padded half
    grid (``interp_stencil``): indices and weights (B, nF, 8), Hermitian-fold flags (B, nF)."""

    idx: Any
    w: Any
    neg: Any

    @classmethod
    def at(cls, R: Any, band: Band, xp: ModuleType) -> _Stencil:
        q = slice_coords(xp.asarray(R, dtype=xp.float64), band, PAD)
        return cls(*interp_stencil(q, PAD * band.D))

    def gather(self, flat: Any) -> Any:
        """Slices (L, B, nF) of L raveled padded FTs flat (L, M) (as ``projection.project``)."""
        xp = xp_of(flat)
        vals = (flat[:, self.idx] * self.w.astype(flat.real.dtype)).sum(axis=-1)
        return xp.where(self.neg, xp.conj(vals), vals)

    def insert(self, acc: Accumulator3D, values: Any | None, weights: Any) -> None:
        """Add values (B, nF) complex (None: skip) to acc.data and weights (B, nF) to acc.weight
        (as ``Accumulator3D.insert``)."""
        xp = acc.xp
        if values is not None:
            v = xp.where(self.neg, xp.conj(values), values)[..., None] * self.w
            view = acc.data.reshape(-1).view(xp.float64)
            scatter_add(view, 2 * self.idx, v.real)
            scatter_add(view, 2 * self.idx + 1, v.imag)
        scatter_add(acc.weight, self.idx, weights[..., None] * self.w)


class Var3D:
    """State: mean V0 (D, D, D), mask (D, D, D), sigma2 (D//2,), alpha (N,), components ``comps``
    (K', D, D, D) stored as sqrt(eigenvalue) x unit masked norm, eigenvalues (K',), latents z and
    z_std (N, K') (unit-norm component units, from the last E-step; K' = ``n_carried``: K + p
    during the warm-up, then K), iteration counter t,
    ``finalized`` and per-iteration ``history``. R (N, 3, 3), shifts (N, 2) px: fixed poses."""

    def __init__(self, settings: Settings, xp: ModuleType, R: np.ndarray, shifts: np.ndarray, seed: int) -> None:
        s = settings
        self.s, self.xp, self.seed = s, xp, seed
        self.R = np.asarray(R, dtype=np.float64).reshape(-1, 3, 3)
        self.shifts = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
        self.N, K, D = self.R.shape[0], s.n_components + s.oversample, s.D
        self.band = Band(D, s.r_max)
        self.V0 = xp.zeros((D, D, D), dtype=xp.float32)
        self.mask = xp.ones((D, D, D), dtype=xp.float32)
        self.sigma2 = xp.ones(D // 2)
        self.alpha = np.ones(self.N)
        self.comps = xp.zeros((K, D, D, D), dtype=xp.float32)
        self.eigenvalues = np.zeros(K)
        self.z = np.zeros((self.N, K))
        self.z_std = np.zeros((self.N, K))
        self.t = 0
        self.finalized = False
        self.history: dict[str, list] = {"eigenvalues": [], "subspace_change": [], "loglik_gain": []}
        self._filter = component_filter(D, s.pixel_size, s.filter_res_A, s.filter_order, s.highpass_res_A, xp)

    # ------------------------------------------------------------------ properties
    @property
    def n_carried(self) -> int:
        """Components the EM carries now: K + oversample during the warm-up, then K."""
        return int(self.comps.shape[0])

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(k, m), k <= m, of the carried components: the diagonal first."""
        K = self.n_carried
        return [(k, k) for k in range(K)] + [(k, m) for k in range(K) for m in range(k + 1, K)]

    @property
    def components(self) -> Any:
        """Components of unit masked norm (K, D, D, D) float32, ordered by eigenvalue."""
        scale = 1.0 / np.sqrt(np.maximum(self.eigenvalues, 1e-300))
        return (self.comps * self.xp.asarray(scale, dtype=self.xp.float32)[:, None, None, None]).astype(
            self.xp.float32)

    # ------------------------------------------------------------------ building blocks
    def _chunks(self, label: str, progress: Progress | None) -> Iterator[np.ndarray]:
        for i in range(0, self.N, self.s.chunk):
            if progress is not None:
                progress(label, i, self.N)
            yield np.arange(i, min(i + self.s.chunk, self.N))
        if progress is not None:
            progress(label, self.N, self.N)

    def _filtered(self, maps: Any) -> Any:
        """mask x maps (K, D, D, D), then the component filter."""
        return irfft3c(rfft3c(maps * self.mask) * self._filter, self.s.D).astype(self.xp.float32)

    def _orthonormal(self, maps: Any) -> tuple[Any, np.ndarray]:
        """(Q, L): maps = L Q with Q orthonormal in <., .>_M and L (K, K) lower triangular
        (Gram-Schmidt via the Cholesky factor of the masked Gram matrix)."""
        gram = masked_gram(maps, self.mask)
        L = np.linalg.cholesky(gram + 1e-12 * np.trace(gram) * np.eye(gram.shape[0]))
        Q = self.xp.asarray(np.linalg.inv(L)) @ maps.reshape(maps.shape[0], -1).astype(self.xp.float64)
        return Q.reshape(maps.shape).astype(self.xp.float32), L

    def _fts(self, maps: Any) -> Any:
        """Raveled padded FTs (L, M) of maps (L, D, D, D) (``prepare_volume``)."""
        return self.xp.stack([prepare_volume(v, PAD).data.reshape(-1) for v in maps])

    def _inv_sigma2(self) -> Any:
        """Band weight / sigma2 per band pixel (nF,) float64."""
        return self.band.on(self.xp, "weight") * noise_weights(self.sigma2, self.band)

    def _new_accs(self) -> list[Accumulator3D]:
        return [Accumulator3D(self.s.D, PAD, self.xp) for _ in self.pairs]

    def _estep(self, X: Any, C: Any, idx: np.ndarray, fts: Any,
               accs: list[Accumulator3D] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """E-step of particles idx (X, C on ``band``) against the maps whose FTs are fts (K+1, M)
        (V0 first); inserts into ``accs`` if given. Returns host mu (B, K), posterior covariance
        (B, K, K), sum_i E[z_i z_i^T] (K, K) and the summed log-likelihood gain."""
        xp, K = self.xp, fts.shape[0] - 1
        Xs = X * particle_phases(self.band, xp.asarray(self.shifts[idx]), xp)
        aC = (C * xp.asarray(self.alpha[idx], dtype=xp.float32)[:, None]).astype(xp.float32)
        inv = self._inv_sigma2()
        n_pose = (3 if self.s.pose_sd_deg > 0 else 0) + (2 if self.s.shift_sd_px > 0 else 0)
        nF = self.band.n * (K + 2 + n_pose)
        order = accs[0].chunks(idx.size, nF) if accs else InOrder(
            batch_slices(idx.size, stencil_chunk(idx.size, nF, 3, xp), xp))
        parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, float]] = {}

        def one(sl: slice) -> None:
            st = _Stencil.at(self.R[idx[sl]], self.band, xp)
            P = st.gather(fts)
            ac = aC[sl]
            r = (Xs[sl] - ac * P[0]).astype(xp.complex128)
            W = (ac[None] * P[1:]).astype(xp.complex128)
            Dn = self._pose_columns(idx[sl], ac, P[0], fts[:1])
            if Dn is not None:
                W = xp.concatenate([W, Dn])
            Wr, Wi = W.real * inv, W.imag * inv
            G = to_host(xp.einsum("kbf,lbf->bkl", Wr, W.real) + xp.einsum("kbf,lbf->bkl", Wi, W.imag))
            b = to_host(xp.einsum("kbf,bf->bk", Wr, r.real) + xp.einsum("kbf,bf->bk", Wi, r.imag))
            A = np.eye(W.shape[0]) + G
            cov_all = np.linalg.inv(A)
            mu_all = np.einsum("bkl,bl->bk", cov_all, b)
            mu, cov = mu_all[:, :K], cov_all[:, :K, :K]
            S = cov + mu[:, :, None] * mu[:, None, :]
            gain = float(0.5 * (np.einsum("bk,bk->", b, mu_all) - np.linalg.slogdet(A)[1].sum()))
            parts[order.index(sl)] = (mu, cov, S.sum(axis=0), gain)
            if accs is not None:
                w2 = (ac.astype(xp.float64) ** 2) * inv
                Sd, mud = xp.asarray(S), xp.asarray(mu)
                base = r * (ac * inv)
                Ezd = None if Dn is None else xp.asarray(cov_all[:, :K, K:] + mu[:, :, None] * mu_all[:, None, K:])

                def target(k: int) -> Any:
                    """What component k is fitted to: E[z_k (r - D d)] x alpha C / sigma2."""
                    if Ezd is None:
                        return mud[:, k, None] * base
                    return mud[:, k, None] * base - xp.einsum("jb,jbf->bf", Ezd[:, k].T, Dn) * (ac * inv)

                with order.turn(sl):
                    for c, (k, m) in enumerate(self.pairs):
                        st.insert(accs[c], target(k) if c < K else None, Sd[:, k, m, None] * w2)

        map_batches(one, order.slices, xp, order)
        mus, covs, seconds, gains = zip(*(parts[i] for i in range(len(order.slices))), strict=True)
        return np.concatenate(mus), np.concatenate(covs), np.sum(seconds, axis=0), float(sum(gains))

    def _pose_columns(self, idx: np.ndarray, ac: Any, P0: Any, ft0: Any) -> Any | None:
        """Derivatives (J, B, nF) complex128 of the mean's projections ac P_R V0 with respect to
        small rotations (3, finite differences) and shifts (2) of each particle, in units of the
        prior s.d. (``pose_sd_deg``, ``shift_sd_px``); None when both are 0."""
        s, xp = self.s, self.xp
        cols = []
        if s.pose_sd_deg > 0:
            eps = math.radians(0.5)
            for j in range(3):
                v = np.zeros(3)
                v[j] = eps
                Rj = self.R[idx] @ rotvec_to_matrix(v)
                Pj = _Stencil.at(Rj, self.band, xp).gather(ft0)[0]
                cols.append((ac * (Pj - P0)).astype(xp.complex128) * (math.radians(s.pose_sd_deg) / eps))
        if s.shift_sd_px > 0:
            for name in ("kx", "ky"):
                f = self.band.on(xp, name).astype(xp.float64)
                cols.append((ac * P0).astype(xp.complex128) * (-2j * math.pi * f / s.D * s.shift_sd_px))
        return xp.stack(cols) if cols else None

    def _solve(self, accs: list[Accumulator3D]) -> Any:
        """Per-voxel solve of (G + lambda' I) V = H -> real maps (K, D, D, D) float32."""
        xp, K, D = self.xp, self.n_carried, self.s.D
        folded = [a.hermitian() for a in accs]
        shells = accs[0].shells()
        trace = sum(folded[k][1] for k in range(K)) / K
        inside = (shells < D // 2) & (trace > 0)
        sh = shells[inside]
        n_sh = D // 2
        counts = xp.bincount(shells[shells < n_sh], minlength=n_sh)
        mean_tr = xp.bincount(sh, weights=trace[inside], minlength=n_sh) / xp.maximum(counts, 1)
        Gm = xp.empty((int(sh.size), K, K))
        for c, (k, m) in enumerate(self.pairs):
            Gm[:, k, m] = folded[c][1][inside]
            Gm[:, m, k] = Gm[:, k, m]
        Gm += (self.s.lambda_reg * mean_tr[sh])[:, None, None] * xp.eye(K)
        H = xp.stack([folded[k][0][inside] for k in range(K)], axis=1)
        sol = xp.linalg.solve(Gm, xp.stack([H.real, H.imag], axis=-1))
        grid = xp.zeros((K, *shells.shape), dtype=xp.complex128)
        grid[:, inside] = (sol[..., 0] + 1j * sol[..., 1]).T
        real = crop_centred(irfft3c(grid, PAD * D), D, 3) / gridding_kernel(D, PAD, 3, xp)
        return real.astype(xp.float32)

    # ------------------------------------------------------------------ preparation
    def prepare(self, load: Loader, consensus: Any = None, mask: Any = None, alpha: np.ndarray | None = None,
                progress: Progress | None = None) -> None:
        """Fixed quantities through ``Class3D.prepare`` (module doc) and the initial components.

        consensus, mask (D, D, D) or None; alpha (N,) for scale mode "input". ValueError when the
        consensus does not fit the particles or the inputs are inconsistent."""
        s, xp, K = self.s, self.xp, self.n_carried
        r_init = min(float(s.r_max), s.D * s.pixel_size / s.filter_res_A) if s.filter_res_A else float(s.r_max)
        base = c3.Class3D(c3.Settings(n_classes=1, D=s.D, pixel_size=s.pixel_size, r_max=s.r_max, r_init=r_init,
                                      scale_mode=s.scale_mode, mask_threshold=s.mask_threshold,
                                      mask_near_px=s.mask_near_px, mask_far_px=s.mask_far_px, chunk=s.chunk),
                          xp, self.R, self.shifts, self.seed)
        # the class map of Class3D is not used: a zero initial map costs nothing
        base.prepare(load, consensus, mask, None, xp.zeros((1, s.D, s.D, s.D), dtype=xp.float32), alpha, progress)
        self.V0, self.mask, self.sigma2, self.alpha = base.consensus, base.solvent, base.sigma2, base.alpha
        if float(xp.sum(self.mask)) <= 0:
            raise ValueError("the mask is empty")
        rng = np.random.default_rng([self.seed, 5 << 20])
        noise = xp.asarray(rng.standard_normal((K, s.D, s.D, s.D)), dtype=xp.float32)
        Q, _ = self._orthonormal(self._filtered(noise))
        idx = np.sort(rng.choice(self.N, min(self.N, c3.NOISE_BATCH), replace=False))
        _, C = load(idx, self.band)
        aC = C * xp.asarray(self.alpha[idx], dtype=xp.float32)[:, None]
        st = _Stencil.at(self.R[idx], self.band, xp)
        P = st.gather(self._fts(Q)) * aC[None]
        power = to_host(((P.real**2 + P.imag**2) * self._inv_sigma2()).sum(axis=-1).mean(axis=1))
        self.eigenvalues = 1.0 / np.maximum(power, 1e-30)
        self.comps = Q * xp.asarray(np.sqrt(self.eigenvalues), dtype=xp.float32)[:, None, None, None]

    # ------------------------------------------------------------------ iterations
    def step(self, load: Loader, progress: Progress | None = None) -> dict[str, Any]:
        """One EM iteration (E-step over all particles, M-step, post-solve projections)."""
        xp, K, n = self.xp, self.n_carried, self.s.n_components
        fts = self._fts(xp.concatenate([self.V0[None], self.comps]))
        accs = self._new_accs()
        second, gain = np.zeros((K, K)), 0.0
        for idx in self._chunks(f"iteration {self.t + 1}", progress):
            X, C = load(idx, self.band)
            mu, cov, S, g = self._estep(X, C, idx, fts, accs)
            second += S
            gain += g
            self._store_latents(idx, mu, cov)
        old = self.components
        Q, L = self._orthonormal(self._filtered(self._solve(accs)))
        lam, U = np.linalg.eigh(L.T @ (second / self.N) @ L)
        order = np.argsort(lam)[::-1]
        lam, U = np.maximum(lam[order], 1e-30), U[:, order]
        Q = (xp.asarray(U.T) @ Q.reshape(K, -1).astype(xp.float64)).reshape(Q.shape).astype(xp.float32)
        self.t += 1
        if self.t >= self.s.warm_iterations and n < K:  # end of the warm-up: the weakest extra components go
            Q, lam = Q[:n], lam[:n]
            self.z, self.z_std = self.z[:, :n], self.z_std[:, :n]
        cross = masked_gram(xp.concatenate([old[:n], Q[:n]]), self.mask)[:n, n:]
        change = float(np.sqrt(max(0.0, 1.0 - np.linalg.svd(cross, compute_uv=False).min() ** 2)))
        self.eigenvalues = lam
        self.comps = Q * xp.asarray(np.sqrt(lam), dtype=xp.float32)[:, None, None, None]
        m = {"eigenvalues": [float(x) for x in lam[:n]], "subspace_change": change, "loglik_gain": gain / self.N}
        for key in self.history:
            self.history[key].append(m[key])
        return m

    def _store_latents(self, idx: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> None:
        """Latents of the current components in unit-norm component units."""
        sq = np.sqrt(self.eigenvalues)
        self.z[idx] = mu * sq
        self.z_std[idx] = np.sqrt(np.einsum("bkk->bk", cov)) * sq

    def finalize(self, load: Loader, progress: Progress | None = None) -> None:
        """E-step with the final components: latents z and z_std that belong to them."""
        xp = self.xp
        fts = self._fts(xp.concatenate([self.V0[None], self.comps]))
        for idx in self._chunks("latents", progress):
            X, C = load(idx, self.band)
            mu, cov, _, _ = self._estep(X, C, idx, fts, None)
            self._store_latents(idx, mu, cov)
        self.finalized = True

    def run(self, load: Loader, after: Callable[[dict[str, Any]], None] | None = None,
            progress: Progress | None = None) -> None:
        """Iterate to ``n_iterations`` (``after(metrics)`` after each), then ``finalize``."""
        while self.t < self.s.n_iterations:
            m = self.step(load, progress)
            if after is not None:
                after(m)
        if not self.finalized:
            self.finalize(load, progress)

    def latent_variance(self) -> np.ndarray:
        """mean_i E[z_ik^2] (K,) of the stored latents."""
        return np.mean(self.z**2 + self.z_std**2, axis=0)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, np.ndarray]:
        """Host arrays that restore the engine with ``load_state``."""
        hist = {f"h_{k}": np.asarray(v, dtype=np.float64) for k, v in self.history.items()}
        return {"V0": to_host(self.V0), "mask": to_host(self.mask), "sigma2": to_host(self.sigma2),
                "alpha": self.alpha, "comps": to_host(self.comps), "eigenvalues": self.eigenvalues, "z": self.z,
                "z_std": self.z_std, "counters": np.asarray([self.t, int(self.finalized)]), **hist}

    def load_state(self, d: dict[str, np.ndarray]) -> None:
        xp = self.xp
        for key in ("V0", "mask", "sigma2", "comps"):
            setattr(self, key, xp.asarray(d[key]))
        self.alpha, self.eigenvalues = np.asarray(d["alpha"]), np.asarray(d["eigenvalues"])
        self.z, self.z_std = np.asarray(d["z"]), np.asarray(d["z_std"])
        self.t, fin = (int(x) for x in d["counters"])
        self.finalized = bool(fin)
        for key in self.history:
            self.history[key] = np.asarray(d[f"h_{key}"]).tolist()
