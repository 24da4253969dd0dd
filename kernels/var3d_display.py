"""3DVA display (algorithms.md §9.3): maps along latent coordinates and clusters in latent space.

- simple: frames V0 + c_j V_k, c_j evenly spaced between the p-th and (100 - p)-th percentile of
  z_k (linear extrapolation of the model only).
- intermediates: frame centres c_j as in simple mode (spacing dc); particle i enters frame j with
  w_ij = max(0, 1 - |z_ik - c_j| / (width dc)) / max(width, 1) (triangular, width in frames; the
  division makes the weights of an interior particle sum to 1 [I]), width 0: top-hat bins of width
  dc centred on c_j, width -1: bins of equal particle count between quantiles of z_k (centres:
  bin medians). Each frame is a Wiener reconstruction of its weighted particles with their known
  poses (``weighted_maps``).
- cluster: a Gaussian mixture with full covariances fitted by EM to the latents (``fit_gmm``;
  k-means++ seeding), one reconstruction per cluster.

``weighted_maps`` back-projects (§1.5) with weight w_ij x alpha_i C_i per particle, half set by
half set, and regularises each map with tau2 from its own half-map FSC (as class3d does for its
classes). The noise weights 1/sigma2(r) are left out: with one noise spectrum for all particles
they cancel between numerator and denominator, and tau2 from the FSC adapts to the scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import to_host, xp_of
from kernels.fourier import Band
from kernels.fsc import fsc
from kernels.reconstruction import Accumulator3D, backproject, tau2_from_fsc, wiener

Loader = Callable[[np.ndarray, Band], tuple[Any, Any]]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Frames:
    """Frames along one latent coordinate: centres (F,), width in frames (-1, 0 or > 0) and, for
    equal-count bins (width -1), the bin edges (F + 1,)."""

    centres: np.ndarray
    width: float
    edges: np.ndarray | None = None

    @classmethod
    def along(cls, z: np.ndarray, n_frames: int, percentile: float, width: float = 0.0) -> Frames:
        """Frames for latents z (N,); ValueError when z has no spread between the percentiles."""
        if not (width == -1 or width >= 0):
            raise ValueError(f"width must be -1, 0 or positive, got {width}")
        lo, hi = np.percentile(z, [percentile, 100.0 - percentile])
        if not hi > lo:
            raise ValueError("the latent coordinate has no spread between the percentiles")
        if width == -1:
            edges = np.quantile(z, np.linspace(0.0, 1.0, n_frames + 1))
            labels = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, n_frames - 1)
            centres = np.array([np.median(z[labels == j]) if np.any(labels == j) else 0.5 * (edges[j] + edges[j + 1])
                                for j in range(n_frames)])
            return cls(centres, -1.0, edges)
        return cls(np.linspace(lo, hi, n_frames), float(width))

    @property
    def spacing(self) -> float:
        """Centre spacing dc."""
        return float(self.centres[1] - self.centres[0]) if self.centres.size > 1 else 1.0

    def weights(self, z: np.ndarray) -> np.ndarray:
        """Frame weights (B, F) float64 of latents z (B,) (module doc)."""
        F = self.centres.size
        if self.edges is not None:
            j = np.clip(np.searchsorted(self.edges, z, side="right") - 1, 0, F - 1)
            return np.eye(F)[j]
        d = np.abs(z[:, None] - self.centres[None, :]) / self.spacing
        if self.width == 0:
            return (d <= 0.5) * (np.arange(F)[None, :] == np.argmin(d, axis=1)[:, None]).astype(np.float64)
        return np.maximum(0.0, 1.0 - d / self.width) / max(self.width, 1.0)

    def nearest(self, z: np.ndarray) -> np.ndarray:
        """Index (B,) of the frame whose centre (or bin) is nearest to each latent."""
        if self.edges is not None:
            return np.clip(np.searchsorted(self.edges, z, side="right") - 1, 0, self.centres.size - 1)
        return np.argmin(np.abs(z[:, None] - self.centres[None, :]), axis=1)


def simple_frames(mean: Any, component: Any, centres: np.ndarray) -> Any:
    """Frames (F, D, D, D) mean + c_j component for c_j in centres (F,), float32."""
    xp = xp_of(mean, component)
    c = xp.asarray(centres, dtype=xp.float32)[:, None, None, None]
    return (mean[None] + c * component[None]).astype(xp.float32)


def weighted_maps(load: Loader, R: np.ndarray, shifts: np.ndarray, alpha: np.ndarray, halves: np.ndarray,
                  weights_of: Callable[[np.ndarray], np.ndarray], n_maps: int, band: Band, chunk: int, xp: ModuleType,
                  mask: Any = None, progress: Progress | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """Reconstructions of n_maps particle weightings.

    R (N, 3, 3), shifts (N, 2) px, alpha (N,) per-particle scale, halves (N,) in {0, 1};
    weights_of(idx) -> (B, n_maps) weights of particles idx; particles are loaded in chunks.
    Returns maps (n_maps, D, D, D) float32, half-map FSC curves (n_maps, D//2) (masked by
    ``mask`` if given; 0 beyond the band) and the summed weight of each map (n_maps,)."""
    D, N = band.D, R.shape[0]
    accs = [[Accumulator3D(D, 2, xp) for _ in range(n_maps)] for _ in range(2)]
    total = np.zeros(n_maps)
    for i in range(0, N, chunk):
        if progress is not None:
            progress("reconstructions", i, N)
        idx = np.arange(i, min(i + chunk, N))
        w = np.asarray(weights_of(idx), dtype=np.float64)
        total += w.sum(axis=0)
        X, C = load(idx, band)
        aC = C * xp.asarray(alpha[idx], dtype=xp.float32)[:, None]
        for h in (0, 1):
            for f in range(n_maps):
                rows = np.flatnonzero((halves[idx] == h) & (w[:, f] > 0))
                if rows.size == 0:
                    continue
                r = xp.asarray(rows)
                backproject(accs[h][f], X[r], xp.asarray(R[idx[rows]]), band, ctf=aC[r],
                            shifts=xp.asarray(shifts[idx[rows]]), weights=xp.asarray(w[rows, f]))
    if progress is not None:
        progress("reconstructions", N, N)
    maps, curves = [], np.zeros((n_maps, D // 2))
    for f, (a0, a1) in enumerate(zip(*accs, strict=True)):
        curve = to_host(fsc(wiener(a0), wiener(a1), mask))
        curve[band.n_shells :] = 0.0
        curves[f] = curve
        full = Accumulator3D(D, 2, xp)
        full.add(a0)
        full.add(a1)
        maps.append(wiener(full, tau2_from_fsc(xp.asarray(curve), full, full=True)))
    return xp.stack(maps), curves, total


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture weights (n,), means (n, d), covariances (n, d, d), mean log-likelihood per point,
    EM iterations and whether EM converged."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    log_likelihood: float
    iterations: int
    converged: bool

    def log_joint(self, z: np.ndarray) -> np.ndarray:
        """log(pi_j N(z_i | mu_j, S_j)) (N, n)."""
        d = z.shape[1]
        L = np.linalg.cholesky(self.covariances)
        diff = z[None, :, :] - self.means[:, None, :]
        sol = np.linalg.solve(L, np.swapaxes(diff, 1, 2))
        maha = (sol**2).sum(axis=1)
        logdet = 2.0 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
        return (np.log(np.maximum(self.weights, 1e-300))[:, None]
                - 0.5 * (maha + logdet[:, None] + d * np.log(2 * np.pi))).T

    def responsibilities(self, z: np.ndarray) -> np.ndarray:
        """Posterior cluster probabilities (N, n)."""
        lj = self.log_joint(z)
        lj -= lj.max(axis=1, keepdims=True)
        p = np.exp(lj)
        return p / p.sum(axis=1, keepdims=True)


def _kmeans_pp(z: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (n, d): each next seed drawn with probability ~ squared distance to the nearest."""
    seeds = [z[rng.integers(z.shape[0])]]
    d2 = ((z - seeds[0]) ** 2).sum(axis=1)
    for _ in range(1, n):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(z.shape[0], 1.0 / z.shape[0])
        seeds.append(z[rng.choice(z.shape[0], p=p)])
        d2 = np.minimum(d2, ((z - seeds[-1]) ** 2).sum(axis=1))
    return np.stack(seeds)


def fit_gmm(z: np.ndarray, n_clusters: int, seed: int = 0, max_iter: int = 300, tol: float = 1e-7,
            reg: float = 1e-6) -> GaussianMixture:
    """EM for a full-covariance Gaussian mixture on z (N, d) (k-means++ means, global covariance,
    equal weights to start). reg x mean variance is added to every covariance diagonal; EM stops
    when the mean log-likelihood per point changes by < tol."""
    z = np.asarray(z, dtype=np.float64)
    N, d = z.shape
    if not 1 <= n_clusters <= N:
        raise ValueError(f"need 1 <= n_clusters <= {N}, got {n_clusters}")
    rng = np.random.default_rng([seed, 7 << 20])
    ridge = reg * max(float(np.mean(np.var(z, axis=0))), 1e-300) * np.eye(d)
    cov0 = np.cov(z, rowvar=False).reshape(d, d) + ridge
    gm = GaussianMixture(np.full(n_clusters, 1.0 / n_clusters), _kmeans_pp(z, n_clusters, rng),
                         np.repeat(cov0[None], n_clusters, axis=0), -np.inf, 0, False)
    prev = -np.inf
    for it in range(1, max_iter + 1):
        lj = gm.log_joint(z)
        top = lj.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(lj - top).sum(axis=1))
        ll = float(lse.mean())
        resp = np.exp(lj - lse[:, None])
        nk = resp.sum(axis=0) + 1e-12
        means = (resp.T @ z) / nk[:, None]
        diff = z[None] - means[:, None]
        covs = np.einsum("ni,nid,nie->nde", resp.T, diff, diff) / nk[:, None, None] + ridge
        converged = abs(ll - prev) < tol
        gm = GaussianMixture(nk / N, means, covs, ll, it, converged)
        if converged:
            break
        prev = ll
    return gm
