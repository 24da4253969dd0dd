"""3D classification without alignment (kernels/class3d.py) against ground truth
(algorithms.md §8.4) on small simulated sets (sim3d.py): D = 24 at 8 Å/px, band to 10 shells
(19 Å), 600 particles, poses = truth perturbed like a consensus refinement: rotation
N(0, 1 deg) and shift N(0, 0.05 px), i.e. §8.4's 0.3 px of a ~1.3 Å/px box (~0.4 Å) in this
box's 8 Å pixels (0.3 px here would be a 2.4 Å error, a 0.8 rad phase error at the band edge).

The §11.3 Bayes oracle sets the SNRs: with the true maps and poses, d_i^2 = sum_half
|C_i P_i (V_A - V_B)|^2 / sigma2 has median ~41 at SNR 0.5 ("easy", §8.4 asks >= 30) and ~8 at
SNR 0.1 ("hard"). The classification oracle is the same E-step as the engine's with the TRUE
maps, true noise and true class fractions.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import norm
from sim3d import Set3D, simulate

from kernels import class3d as c3
from kernels.clustering import adjusted_rand_index as ari
from kernels.fourier import Band
from kernels.masks import threshold_mask
from kernels.projection import prepare_volume, project
from kernels.rotations import rotvec_to_matrix

D, A, R_MAX = 24, 8.0, 10
N = 600


def _settings(K: int = 2, **kw: object) -> c3.Settings:
    """Small-set schedule: 2 batches per epoch (4 O-EM iterations), similarity annealed by 4."""
    return c3.Settings(n_classes=K, D=D, pixel_size=A, r_max=R_MAX, r_init=D * A / 40.0, batch_per_class=150,
                       similarity_end=4, **kw)


def _poses(s: Set3D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True poses perturbed like a consensus refinement (module doc)."""
    rng = np.random.default_rng(seed)
    dR = rotvec_to_matrix(rng.normal(0, np.deg2rad(1.0), (s.R.shape[0], 3)))
    return dR @ s.R, s.shift + rng.normal(0, 0.05, s.shift.shape)


def _run(s: Set3D, settings: c3.Settings, **prepare: object) -> c3.Class3D:
    R, t = _poses(s)
    eng = c3.Class3D(settings, np, R, t, seed=0)
    eng.prepare(s.load, **prepare)
    eng.run(s.load)
    return eng


def _oracle(s: Set3D, truth: np.ndarray, maps: np.ndarray) -> tuple[float, float]:
    """(ARI of the E-step with the true maps, poses, noise and fractions; Bayes accuracy
    mean_i Phi(d_i / 2) of maps[0] vs maps[1], §11.3)."""
    o = c3.Class3D(_settings(len(maps)), np, s.R, s.shift, seed=0)
    sigma2 = D * D * s.noise_var / 2
    o.vols, o.sigma2 = maps.astype(np.float32), np.full(D // 2, sigma2)
    o.pi = np.bincount(truth, minlength=len(maps)) / truth.size
    idx = np.arange(truth.size)
    X, C = s.load(idx, o.band)
    P = project(prepare_volume((maps[0] - maps[1]).astype(np.float32)), s.R, o.band)
    d = np.sqrt((o.band.weight * np.abs(C * P) ** 2).sum(axis=1) / sigma2)
    return ari(o.posteriors(X, C, idx).argmax(axis=1), truth), float(norm.cdf(d / 2).mean())


def _accuracy(cls: np.ndarray, truth: np.ndarray) -> float:
    """Two-class accuracy under the better of the two label matchings."""
    a = float(np.mean(cls == truth))
    return max(a, 1 - a)


@pytest.fixture(scope="module")
def easy() -> Set3D:
    """States full / domain removed, 60/40 (§8.4 SC3 easy)."""
    return simulate([360, 240], D=D, pixel_size=A, snr=0.5, seed=1)


@pytest.fixture(scope="module")
def easy_soft(easy: Set3D) -> c3.Class3D:
    return _run(easy, _settings())


def test_c1_easy_separation(easy: Set3D, easy_soft: c3.Class3D) -> None:
    """C1: ARI >= 0.9, class fractions within +-3% of 60/40, mean class ESS <= 1.1. The oracle
    reaches ARI 1.0 here (Bayes accuracy 0.998), so 0.9 (~97.5% accuracy) leaves room only
    for the noise of 300-particle class maps."""
    eng = easy_soft
    score, (oracle, bayes) = ari(eng.cls, easy.state), _oracle(easy, easy.state, easy.maps)
    frac = np.sort(np.bincount(eng.cls, minlength=2) / N)
    print(f"C1: ARI {score:.3f} (oracle {oracle:.3f}, Bayes accuracy {bayes:.4f}), fractions {frac}, "
          f"mean ESS {eng.ess.mean():.3f}, full passes {eng.n_full}")
    assert oracle >= 0.95
    assert score >= 0.9
    assert np.allclose(frac, [0.4, 0.6], atol=0.03)
    assert eng.ess.mean() <= 1.1
    assert np.allclose(eng.p.sum(axis=1), 1.0) and eng.p.shape == (N, 2)


def test_three_states_with_consensus_poses() -> None:
    """The issue's 3-state mixture (full, domain removed, domain moved) with consensus-like
    poses, K = 3: ARI >= 0.9, as the true-map oracle allows (>= 0.95 asserted here)."""
    s = simulate([200, 200, 200], D=D, pixel_size=A, snr=0.5, seed=2)
    eng = _run(s, _settings(3))
    R, t = _poses(s)
    o = c3.Class3D(_settings(3), np, R, t, seed=0)
    o.vols, o.sigma2 = s.maps.astype(np.float32), np.full(D // 2, D * D * s.noise_var / 2)
    idx = np.arange(N)
    X, C = s.load(idx, o.band)
    oracle = ari(o.posteriors(X, C, idx).argmax(axis=1), s.state)
    score = ari(eng.cls, s.state)
    print(f"3 states: ARI {score:.3f} (oracle {oracle:.3f}), sizes {np.bincount(eng.cls, minlength=3)}")
    assert oracle >= 0.95
    assert score >= 0.9


def test_c6_stops_by_switch_rule(easy_soft: c3.Class3D) -> None:
    """C6: the full passes end by the 2% switch criterion (not the cap of 25), after the
    class similarity reached 0; the history records every iteration."""
    eng, h = easy_soft, easy_soft.history
    assert eng.converged and 2 <= eng.n_full < eng.s.max_full_iters
    assert h["switched"][-1] < 0.02 and h["beta"][-1] == 0.0
    assert sum(h["full"]) == eng.n_full and len(h["full"]) == eng.n_oem + eng.n_full == eng.t
    assert all(np.isfinite(h["rms_change"]))


def test_c6_rms_rule_when_set(easy: Set3D, easy_soft: c3.Class3D) -> None:
    """C6 with the RMS density change rule set: it must hold as well as the switch rule. With a
    threshold no map change meets (1e-9), the run ends at the pass cap unconverged although
    the switch rule alone converged (easy_soft); with a threshold above the measured changes
    it converges after the same number of passes as the switch rule alone."""
    strict = _run(easy, _settings(rms_check=True, rms_tol=1e-9, max_full_iters=easy_soft.n_full + 2))
    assert not strict.converged and strict.n_full == easy_soft.n_full + 2
    loose = _run(easy, _settings(rms_check=True, rms_tol=10.0))
    assert loose.converged and loose.n_full == easy_soft.n_full


def test_force_hard_classification(easy: Set3D, easy_soft: c3.Class3D) -> None:
    """Hard assignments: every class ESS is exactly 1 and the class sizes are the argmax
    counts; the soft run on the same data keeps uncertain particles (ESS > 1.05 for some)
    and soft sizes. Separation is as good as C1."""
    eng = _run(easy, _settings(force_hard=True))
    counts = np.bincount(eng.cls, minlength=2)
    print(f"hard: ARI {ari(eng.cls, easy.state):.3f}, sizes {counts}, soft sizes {easy_soft.pi * N}")
    assert np.array_equal(eng.ess, np.ones(N)) and set(np.unique(eng.p)) <= {0.0, 1.0}
    assert np.allclose(eng.pi * N, counts)
    assert (easy_soft.ess > 1.05).any() and not np.allclose(easy_soft.pi * N, np.bincount(easy_soft.cls))
    assert ari(eng.cls, easy.state) >= 0.9


def test_c2_hard_relative_to_oracle() -> None:
    """C2 (median d^2 ~8): accuracy >= Bayes accuracy - 0.05 (§8.4 allows 0.03 at 20,000
    particles; here each class map comes from ~300 noisy particles; measured 0.888 vs 0.917)."""
    s = simulate([360, 240], D=D, pixel_size=A, snr=0.1, seed=1)
    eng = _run(s, _settings())
    _, bayes = _oracle(s, s.state, s.maps)
    acc = _accuracy(eng.cls, s.state)
    print(f"C2: accuracy {acc:.3f}, Bayes oracle {bayes:.3f}")
    assert 0.85 <= bayes <= 0.97
    assert acc >= bayes - 0.05


def test_c7_no_heterogeneity() -> None:
    """C7, single state, K = 2: the maps correlate >= 0.98 inside the solvent mask (measured
    0.988) and the classes stay mixed. §8.4 asks mean class ESS >= 1.5 at 20,000 particles;
    with 600 particles ML-EM drifts off the symmetric solution along the largest noise
    fluctuation of the few-particle maps (measured: ESS ~1.95 after O-EM, final 1.30 here and
    1.35-1.52 for 4 other seeds), so the gate is 1.2: still far above the ~1.01 of the
    two-state C1 set, which a method that invents classes would approach."""
    s = simulate([N], D=D, pixel_size=A, snr=0.5, seed=2)
    eng = _run(s, dataclasses.replace(_settings(), r_max=8))
    m = np.asarray(eng.solvent) > 0.5
    corr = float(np.corrcoef(eng.vols[0][m], eng.vols[1][m])[0, 1])
    print(f"C7: map correlation {corr:.4f}, mean ESS {eng.ess.mean():.3f}, fractions {eng.pi}")
    assert corr >= 0.98
    assert eng.ess.mean() >= 1.2
    assert eng.pi.min() >= 0.3


def test_focus_mask_ignores_change_elsewhere() -> None:
    """Focus (C3 with a discrete distractor): states full (200), domain 1 removed (200) and
    domain 2 moved by 4 px (200). The target is domain 1's presence. Without a focus mask
    K = 2 splits off the larger change (the moved domain): ARI(target) <= 0.5 (measured ~0.15).
    With a focus mask around domain 1 the classes only differ there: ARI(target) >= 0.9
    (measured 0.96; the E-step with the true maps composed the same way reaches 0.99)."""
    s = simulate([200, 200, 200], D=D, pixel_size=A, snr=0.5, seed=2)
    target = (s.state == 1).astype(int)
    focus = threshold_mask(s.maps[0] - s.maps[1], 0.2, 1.0, 3.0)
    plain = _run(s, _settings())
    focused = _run(s, _settings(), focus=focus)
    a_plain, a_focus = ari(plain.cls, target), ari(focused.cls, target)
    print(f"focus: ARI(target) without {a_plain:.3f}, with {a_focus:.3f}")
    assert a_plain <= 0.5
    assert a_focus >= 0.9
    diff = np.abs(focused.vols[0] - focused.vols[1])[focus == 0]
    assert float(diff.max()) <= 1e-6 * float(np.abs(focused.vols).max())


def test_init_input_maps_and_optimal_scale(easy: Set3D) -> None:
    """Per-particle scale "optimal" (§1.13) on particles scaled by amp ~ U[0.6, 1.6]: within
    each state, the relative error sd(alpha / amp) is <= 1.25 x the Cramer-Rao bound
    sqrt(mean 1 / (amp^2 sum_half |C P V_state|^2 / sigma2)) (measured 1.0x, 1.09x); the consensus
    sets the scale, so the full state has median alpha / amp ~1 (the state without a domain
    is biased low, ~0.84, as alpha is fitted against the 60/40 consensus). Then with input
    maps (the true maps, ``init_maps``; ``prepare`` low-passes them to r_init = 40 Å) and alpha
    given (scale mode "input") the classification reaches C1's ARI."""
    amp = np.random.default_rng(5).uniform(0.6, 1.6, N)

    def load(idx: np.ndarray, band: Band) -> tuple[np.ndarray, np.ndarray]:
        X, C = easy.load(idx, band)
        return X * amp[idx, None].astype(np.float32), C

    R, t = _poses(easy)
    probe = c3.Class3D(_settings(), np, R, t, seed=0)
    probe.prepare(load)
    band, idx = probe.band, np.arange(N)
    _, C = easy.load(idx, band)
    P = np.stack([project(prepare_volume(m.astype(np.float32)), easy.R, band) for m in easy.maps])[easy.state, idx]
    info = (band.weight * np.abs(C * P) ** 2).sum(axis=1) / (D * D * easy.noise_var / 2) * amp**2
    ratio = probe.alpha / amp
    for k in (0, 1):
        m = easy.state == k
        bound = float(np.sqrt(np.mean(1 / info[m])))
        print(f"state {k}: median alpha/amp {np.median(ratio[m]):.3f}, sd {ratio[m].std():.3f}, CR {bound:.3f}")
        assert ratio[m].std() <= 1.25 * bound
    assert 0.9 <= np.median(ratio[easy.state == 0]) <= 1.1
    eng = c3.Class3D(_settings(scale_mode="input"), np, R, t, seed=0)
    eng.prepare(load, init_maps=easy.maps, alpha=probe.alpha)
    eng.run(load)
    assert ari(eng.cls, easy.state) >= 0.9


def test_auto_mask_and_similarity_tuning() -> None:
    """threshold_mask: 1 on the thresholded map, raised-cosine falloff from near to far, 0 beyond.
    tune_similarity: the smallest beta whose mixed posteriors reach the target mean ESS."""
    vol = np.zeros((D, D, D), np.float32)
    vol[12, 12, 12] = 1.0
    m = threshold_mask(vol, 0.5, 2.0, 4.0)
    assert m[12, 12, 12] == 1.0 and m[12, 12, 14] == 1.0 and m[12, 12, 15] == pytest.approx(0.5)
    assert m[12, 12, 16] == 0.0 and m.min() >= 0.0 and m.max() <= 1.0
    p = np.tile([0.98, 0.01, 0.01], (10, 1))
    b = c3.tune_similarity(p, 0.75)
    q = (1 - b) * p + b / 3
    assert np.mean(1 / (q * q).sum(1)) == pytest.approx(2.25, rel=1e-6)
    assert c3.tune_similarity(np.full((4, 3), 1 / 3), 0.75) == 0.0
