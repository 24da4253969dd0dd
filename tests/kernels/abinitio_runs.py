"""Shared set-up of the ab-initio and heterogeneous refinement engine tests (test_abinitio.py,
test_hetero.py): the small sets (sim3d.py) at D = 24, 8 Å/px, band up to 8 shells (24 Å), the
runs both files make and the measures they compare (algorithms.md §5.4, §7.3)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sim3d import Set3D, simulate

from kernels import abinitio as ab
from kernels import hetero as ht
from kernels.clustering import adjusted_rand_index as ari
from kernels.fourier import Band
from kernels.projection import prepare_volume
from kernels.refine3d import expectation, plan_for
from kernels.rotations import angular_distance_deg
from kernels.volume_align import align_volume

D, A, R_MAX, SNR = 24, 8.0, 8, 1.0


def states_set() -> Set3D:
    """3 states (full / one domain removed / one domain moved), 3 x 200, SNR 3."""
    return simulate([200, 200, 200], D=D, pixel_size=A, snr=3.0, seed=1)


def oracle_scores(s: Set3D, n: int = 300) -> tuple[float, float]:
    """(ARI, median angular error deg) of one E-step against the true maps."""
    band = Band(D, R_MAX)
    idx = np.arange(n)
    X, C = s.load(idx, band)
    sigma2 = np.full(D // 2, D * D * s.noise_var / 2)
    K = s.maps.shape[0]
    e = expectation(X, C, sigma2, band, [prepare_volume(m) for m in s.maps], np.log(np.full(K, 1 / K)),
                    plan_for(R_MAX, 2.0), 1.0)
    err = angular_distance_deg(e.result.R[idx, s.state[idx]], s.R[idx])
    return ari(e.p.argmax(1), s.state[idx]), float(np.median(err))


def run_abinitio(s: Set3D, K: int, seed: int = 0, init: int = 10, final: int = 10,
                 similarity_end: int = 16) -> ab.AbInitio:
    """An ab-initio run of ``init`` + annealing (8) + ``final`` iterations on all of s."""
    st = ab.Settings(n_classes=K, D=D, pixel_size=A, r_init=4, r_max=R_MAX, n_init_iters=init,
                     radius_step=0.5, n_final_iters=final, batch_size=150, high_lr_iters=init,
                     similarity_end=similarity_end, shift_extent_px=2.0)
    eng = ab.AbInitio(st, np, len(s.state), seed)
    eng.initialise(s.load)
    for t in range(st.n_iterations):
        eng.iterate(t, s.load)
    return eng


def separation(eng: ab.AbInitio, s: Set3D) -> tuple[float, np.ndarray, np.ndarray]:
    """(ARI of one E-step of all particles with the final maps, class fractions (K,), each
    class map's aligned corr with the true map of its state (K,)). Classes are matched to states
    one to one for the most particles in common."""
    band = Band(D, R_MAX)
    X, C = s.load(np.arange(len(s.state)), band)
    cls = eng.assign(X, C, band).p.argmax(1)
    K = s.maps.shape[0]
    common = np.zeros((K, K), dtype=np.int64)  # K x K even when a class is empty (unlike clustering.contingency)
    np.add.at(common, (cls, s.state), 1)
    _, state_of = linear_sum_assignment(common, maximize=True)
    match = np.array([align_volume(np.asarray(v), s.maps[j]).corr for v, j in zip(eng.vols, state_of, strict=True)])
    return ari(cls, s.state), np.bincount(cls, minlength=K) / cls.size, match


def run_hetero(s: Set3D, maps: np.ndarray) -> ht.Assignment:
    """Hetero refinement of all of s from ``maps`` (K, D, D, D) low-passed to 30 Å: at most 8
    O-EM iterations of 100 particles per class, then one full pass; the final assignment."""
    idx = np.arange(len(s.state))
    band = Band(D, R_MAX)
    st = ht.Settings(n_classes=maps.shape[0], D=D, pixel_size=A, r_max=R_MAX, r_init=round(D * A / 30),
                     batch_per_class=100, n_random_iters=0, max_oem_iters=8, lr_init=0.5, n_full_iters=1,
                     shift_extent_px=2.0)
    het = ht.HeteroRefine(st, np, idx.size, 0)
    het.initialise(maps, s.load)
    for t in range(st.max_oem_iters):
        _, _, m = het.oem_iteration(t, s.load)
        if het.converged(t, m):
            break
    return het.full_iteration([(idx, *s.load(idx, band))], band)
