"""Greyscale of a start map: the factor that puts its CTF-modulated projections on the data's
scale (RELION's "Ref. map is on absolute greyscale?" = No; algorithms.md §1.13).

Maps from another job, box or program carry their own scale (a Wiener map's shrinkage, an
imported map's units). Likelihood scores are not scale-free, so refinements bring every start
map to the data first: ``power_scale`` gives the factor at which projections at random poses
carry all of the data's band power (an upper bound), then each of ``rounds`` coarse searches
multiplies it by the median per-particle least-squares scale (``ls_scales``) at the best poses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from kernels.align3d import SearchResult
from kernels.backend import to_host, xp_of
from kernels.fourier import Band
from kernels.noise import per_particle_scale
from kernels.projection import VolumeFT, prepare_volume, project
from kernels.refine3d import noise_weights
from kernels.rotations import random_rotations
from kernels.scoring import particle_phases

#: Per-particle scales are clipped to [LO, HI] x their median (§1.13).
SCALE_CLIP = (0.2, 5.0)


def power_scale(X: Any, C: Any, band: Band, vft: VolumeFT, sigma2: Any, rng: np.random.Generator) -> float:
    """sqrt(sum w |X|^2 / sum w |C P V|^2) over images X, CTFs C (B, nF) at random rotations
    (w = Hermitian weight / sigma2 (D//2,)): the scale at which projections carry all of the
    data's power."""
    xp = xp_of(X)
    w = band.on(xp, "weight") * noise_weights(sigma2, band)
    P = project(vft, xp.asarray(random_rotations(X.shape[0], rng)), band)
    num = float((xp.abs(X.astype(xp.complex128)) ** 2 @ w).sum())
    den = float(((C.astype(xp.float64) * xp.abs(P.astype(xp.complex128))) ** 2 @ w).sum())
    return math.sqrt(num / den) if den > 0 else 1.0


def ls_scales(X: Any, C: Any, band: Band, vft: VolumeFT, R: Any, shifts: Any, sigma2: Any, r_lo: float) -> np.ndarray:
    """alpha_i = Re<X_i, C_i P_i V> / <C_i P_i V, C_i P_i V> (noise-weighted) on shells > r_lo
    at poses R (B, 3, 3), shifts (B, 2) px, clipped to SCALE_CLIP x the median; all ones when
    the median is not positive (a map that explains none of the data). (B,) float64 host."""
    xp = xp_of(X)
    cols = xp.asarray(np.flatnonzero(band.shell > r_lo))
    P = project(vft, R, band)[:, cols]
    Xs = (X * particle_phases(band, shifts, xp))[:, cols]
    a = to_host(per_particle_scale(Xs, C[:, cols] * P, noise_weights(sigma2, band)[cols],
                                   band.on(xp, "weight")[cols]))
    med = float(np.median(a))
    return np.clip(a, SCALE_CLIP[0] * med, SCALE_CLIP[1] * med) if med > 0 else np.ones_like(a)


def match_greyscale(X: Any, C: Any, band: Band, vol: Any, mask: Any, sigma2: Any,
                    search: Callable[[VolumeFT], SearchResult], rng: np.random.Generator,
                    rounds: int = 2) -> tuple[float, SearchResult]:
    """The greyscale factor of ``vol`` (D, D, D) for images X, CTFs C (B, nF) on ``band`` (module
    doc) and the last search, made by ``search`` against the scaled map x ``mask`` (None: no
    mask) before its median update. ``rounds`` >= 1."""
    g = power_scale(X, C, band, prepare_volume(vol), sigma2, rng)
    masked = vol if mask is None else vol * mask
    for _ in range(rounds):
        vft = prepare_volume(masked * g)
        res = search(vft)
        g *= float(np.median(ls_scales(X, C, band, vft, res.R[:, 0], res.shifts[:, 0], sigma2, band.r_min)))
    return g, res
