"""2D classification engine (kernels/classify2d.py) against ground truth, algorithms.md §3.5.

Data (c2d_views.py): D = 48, a = 4 Å, 10 views with pairwise in-plane-aligned correlation < 0.7,
psi ~ U[0, 360), shifts N(0, 2 px) clipped at 6 px, CTF (defocus 1-2.5 um), white noise at
SNR 0.1 (§11.2); 100 particles per view (views selected at < 0.68 on a 5 deg grid).
Classification at 16 Å (working box 28, r_max 12).
The design check (§11.3) verifies the closest pair of views is easy at this SNR in the band.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from c2d_views import ViewSet, add_junk, aligned_corr, band_ctf, edge_images, simulate

from kernels import classify2d as c2
from kernels.clustering import adjusted_rand_index as ari
from kernels.fourier import Band, fourier_crop, rfft2c, shift_phase
from kernels.fsc import fsc
from kernels.phantom import blob_images, project_atoms
from kernels.rotations import euler_to_matrix, inplane_matrices
from kernels.scoring import particle_phases, score_direct

D, A = 48, 4.0
R_MAX = 12
DW = 28
AW = D * A / DW
SNR = 0.1
TIMINGS: dict[str, float] = {}


def majority(cls: np.ndarray, view: np.ndarray, K: int) -> np.ndarray:
    """Majority true view of each class (-1 for empty classes)."""
    M = np.zeros((K, view.max() + 1), int)
    np.add.at(M, (cls, view), 1)
    return np.where(M.sum(1) > 0, M.argmax(1), -1)


def settings(K: int, **kw) -> c2.Settings:
    return c2.Settings(n_classes=K, D=DW, pixel_size=AW, r_max=R_MAX,
                       psi_step_deg=math.degrees(1.0 / R_MAX), shift_radius_px=0.15 * DW, **kw)


class Data:
    """Band data and CTFs of a ViewSet at the working box."""

    def __init__(self, vs: ViewSet) -> None:
        self.vs = vs
        self.band = Band(DW, R_MAX)
        crop = fourier_crop(vs.images, DW, ndim=2)
        self.X = self.band.gather(rfft2c(crop))
        self.C = band_ctf(vs, np.arange(vs.view.size), self.band, AW)

    def load(self, idx: np.ndarray):
        return self.X[idx], self.C[idx]

    def chunks(self, n: int = 500):
        N = self.X.shape[0]
        for i in range(0, N, n):
            idx = np.arange(i, min(i + n, N))
            yield idx, self.X[idx], self.C[idx]


def classify(data: Data, K: int, schedule: c2.Schedule, seed: int = 0, **kw):
    clf = c2.Classifier2D(settings(K, **kw), np)
    em = c2.OnlineEM(clf, schedule, data.X.shape[0], seed)
    t0 = time.perf_counter()
    em.seed_classes(data.load)
    for t in range(schedule.num_oem_iterations):
        em.oem_iteration(t, data.load)
    t1 = time.perf_counter()
    out = em.full_iteration(data.chunks())
    t2 = time.perf_counter()
    TIMINGS[f"K{K} oem/iter"] = (t1 - t0) / max(schedule.num_oem_iterations, 1)
    TIMINGS[f"K{K} full pass"] = t2 - t1
    return clf, out


def schedule(K: int, per_class: int, iters: int = 12, **kw) -> c2.Schedule:
    return c2.Schedule(num_oem_iterations=iters, batch_size=K * per_class, anneal_start=1,
                       anneal_iters=iters - 4, **kw)


@pytest.fixture(scope="module")
def views() -> Data:
    return Data(simulate([100] * 10, D=D, pixel_size=A, snr=SNR, seed=6))


@pytest.fixture(scope="module")
def run10(views: Data):
    return classify(views, 10, schedule(10, 40))


# -- unit checks --------------------------------------------------------------------------


def test_window_scores_match_direct() -> None:
    """The E-step logits equal -diff2 (direct loop, kernels.scoring) + log prior at every
    integer shift of the window, for random data, CTF and noise model."""
    rng = np.random.default_rng(3)
    clf = c2.Classifier2D(settings(2), np)
    band = clf.band
    clf.sigma2 = rng.uniform(0.5, 2.0, band.n_shells)
    clf.refs = rng.normal(size=(2, DW, DW)).astype(np.float32)
    X = band.gather(rfft2c(rng.normal(size=(3, DW, DW)).astype(np.float32)))
    C = rng.uniform(-1, 1, (3, band.n)).astype(np.float32)
    psis = np.array([0.0, 37.0, 200.0])
    A = clf.rotated_refs(psis)
    (sl, lg), = list(clf.window_logits(X, C, psis, 2.0))
    w = band.weight / clf.sigma2[band.shell]
    direct = score_direct(X, C, w, particle_phases(band, c2.shift_window(0.15 * DW)),
                          A.reshape(-1, band.n))  # (B, T, K*n_psi)
    want = -np.transpose(direct, (0, 2, 1)).reshape(lg.shape) / 2.0 + clf._log_prior_t
    np.testing.assert_allclose(lg, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_window_neighbours() -> None:
    shifts = c2.shift_window(1.5)  # 3 x 3 square
    nb = c2.window_neighbours(shifts)
    i = {tuple(map(int, t)): n for n, t in enumerate(shifts)}
    assert nb[i[0, 0], 0].tolist() == [i[-1, 0], i[1, 0]]
    assert nb[i[0, 0], 1].tolist() == [i[0, -1], i[0, 1]]
    assert nb[i[1, 1], 0].tolist() == [i[0, 1], -1]


def test_capacity_assign() -> None:
    """Greedy by confidence: no class over capacity; confident particles keep their class;
    responsibilities of full classes are zero and rows renormalised."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(3, 0.3), 200)
    p[:, 0] += 1.0  # everybody prefers class 0
    p /= p.sum(1, keepdims=True)
    hard, pc = c2.capacity_assign(p, 70)
    counts = np.bincount(hard, minlength=3)
    assert counts.max() <= 70 and counts.sum() == 200
    conf = np.argsort(-p.max(1))
    assert np.all(hard[conf[:70]] == 0) and np.all(hard[conf[70:]] != 0)
    np.testing.assert_allclose(pc.sum(1), 1.0)
    assert np.all(pc[conf[70:], 0] == 0)
    h2, p2 = c2.capacity_assign(p, None)
    np.testing.assert_array_equal(h2, p.argmax(1))
    with pytest.raises(ValueError):
        c2.capacity_assign(p, 60)


def test_anneal_schedule() -> None:
    sch = c2.Schedule(icuf=2.0, anneal_start=2, anneal_iters=15)
    assert sch.temperature(0) == sch.temperature(1) == 4.0
    assert sch.temperature(2) == pytest.approx(4.0)
    assert 1.0 < sch.temperature(10) < 4.0 and sch.temperature(17) == 1.0
    assert c2.Schedule(anneal=False).temperature(0) == 1.0


# -- acceptance (§3.5) --------------------------------------------------------------------


def test_design_check(views: Data) -> None:
    """§11.3: closest pair of views, in-plane aligned, noise-weighted distance in the band
    d^2 >= 30 for the median particle CTF (Bayes error ~ Phi(-d/2) < 0.3%)."""
    vs = views.vs
    psi = np.arange(0, 360, 2.0)
    best = (0.0, 0, 0, 0, np.zeros(2))
    for a in range(10):
        for b in range(a + 1, 10):
            R = euler_to_matrix(np.full(psi.size, vs.view_angles[b, 0]), vs.view_angles[b, 1], psi)
            rot_b = project_atoms(vs.atoms, R, np.zeros((psi.size, 2)), D)
            c, j, t = aligned_corr(vs.views[a], rot_b)
            if c > best[0]:
                best = (c, a, b, j, t)
    c, a, b, j, t = best
    R = euler_to_matrix(vs.view_angles[b, 0], vs.view_angles[b, 1], psi[j])
    diff = vs.views[a] - project_atoms(vs.atoms, R, t[None], D)[0]
    band = Band(D, R_MAX)
    F = band.gather(rfft2c(diff[None]))
    ctf = band_ctf(vs, np.arange(vs.view.size), band, A)
    sigma2 = D * D * vs.noise_var / 2
    d2 = (band.weight * np.abs(F) ** 2 * ctf**2).sum(1) / (2 * sigma2) * 2
    print(f"design: closest pair corr {c:.3f}, median d^2 {np.median(d2):.1f}")
    assert c < 0.7
    assert np.median(d2) >= 30, np.median(d2)


def test_t1_recovery_k10(run10, views: Data) -> None:
    """T1: K = true views: ARI >= 0.85 and every view is the majority of some class."""
    _, out = run10
    score = ari(out.cls, views.vs.view)
    print(f"T1 K=10 ARI {score:.4f}; timings {TIMINGS}")
    assert score >= 0.85
    assert set(majority(out.cls, views.vs.view, 10)) >= set(range(10))


def test_t1_purity_k20(views: Data) -> None:
    """T1: K = 2 x views: purity >= 0.95."""
    _, out = classify(views, 20, schedule(20, 15, iters=10))
    maj = majority(out.cls, views.vs.view, 20)
    purity = float(np.mean(maj[out.cls] == views.vs.view))
    print(f"T1 K=20 purity {purity:.4f}; timings {TIMINGS}")
    assert purity >= 0.95


def _class_offsets(out, vs: ViewSet, maj: np.ndarray):
    """Per class: in-plane offset phi_k (deg) and centre offset s_k (px at D) such that
    psi_true = psi + phi_k and t_true = t + M(psi) s_k (correctly classified particles)."""
    ok = maj[out.cls] == vs.view
    f = DW / D  # working px per original px
    t_est = out.shift / f
    phi, s = {}, {}
    for k in np.unique(out.cls[ok]):
        m = ok & (out.cls == k)
        d = np.deg2rad(vs.psi[m] - out.psi[m])
        phi[k] = np.rad2deg(np.arctan2(np.sin(d).mean(), np.cos(d).mean()))
        M = inplane_matrices(out.psi[m])
        s[k] = np.einsum("bji,bj->bi", M, vs.shift[m] - t_est[m]).mean(0)
    return ok, t_est, phi, s


def test_t2_pose_accuracy(run10, views: Data) -> None:
    """T2: circular median |psi error| <= 3 deg, median shift error <= 0.5 px (after composing
    with each class's global in-plane and centre offsets)."""
    _, out = run10
    vs = views.vs
    maj = majority(out.cls, vs.view, 10)
    ok, t_est, phi, s = _class_offsets(out, vs, maj)
    idx = np.flatnonzero(ok)
    phis = np.array([phi[k] for k in out.cls[idx]])
    dpsi = (vs.psi[idx] - out.psi[idx] - phis + 180) % 360 - 180
    M = inplane_matrices(out.psi[idx])
    sk = np.stack([s[k] for k in out.cls[idx]])
    dt = vs.shift[idx] - t_est[idx] - np.einsum("bij,bj->bi", M, sk)
    med_psi = float(np.median(np.abs(dpsi)))
    med_t = float(np.median(np.linalg.norm(dt, axis=1)))
    print(f"T2 median |dpsi| {med_psi:.2f} deg, median |dt| {med_t:.3f} px")
    assert med_psi <= 3.0
    assert med_t <= 0.5


def _truth_image(vs: ViewSet, v: int, psi: float, shift: np.ndarray) -> np.ndarray:
    R = euler_to_matrix(vs.view_angles[v, 0], vs.view_angles[v, 1], psi)
    return fourier_crop(project_atoms(vs.atoms, R, shift[None], D), DW, ndim=2)[0]


def _r_at(curve: np.ndarray, level: float = 0.5) -> int:
    below = np.flatnonzero(curve[1:] < level)
    return int(below[0]) if below.size else curve.size - 1


def test_t3_class_average_frc(run10, views: Data) -> None:
    """T3: FRC(class average, aligned CTF-free truth) >= 0.5 out to >= 90% of the shell where
    the oracle average (true classes and poses, same Wiener filter) reaches 0.5."""
    clf, out = run10
    vs = views.vs
    maj = majority(out.cls, vs.view, 10)
    ok, _, phi, s = _class_offsets(out, vs, maj)
    oracle = c2.Classifier2D(settings(10, recenter=False), np)
    oracle.sigma2 = clf.sigma2
    N = vs.view.size
    e = c2.EStep(loglik=None, psi=np.repeat(vs.psi[:, None], 10, 1),
                 shift=np.repeat((vs.shift * DW / D)[:, None], 10, 1),
                 psi_index=np.zeros((N, 10), int), pose_ess=None)
    p = np.eye(10)[vs.view]
    oracle.accumulate(oracle.stats, views.X, views.C, p, e, np.arange(N) % 2, np.array([0.0]))
    oracle.maximize()
    for v in range(10):
        truth0 = _truth_image(vs, v, 0.0, np.zeros(2))
        r_oracle = _r_at(fsc(oracle.refs[v], truth0, ndim=2))
        k = int(np.flatnonzero(maj == v)[np.argmax([np.sum((out.cls == k) & ok)
                                                     for k in np.flatnonzero(maj == v)])])
        truth = _truth_image(vs, v, phi[k], s[k])
        r_class = _r_at(fsc(clf.refs[k], truth, ndim=2))
        print(f"T3 view {v}: class {k} FRC0.5 shell {r_class}, oracle {r_oracle}")
        assert r_class >= 0.9 * r_oracle


def test_t6_determinism(views: Data) -> None:
    """T6 (NumPy): the same seed gives identical assignments and averages."""
    sub = Data.__new__(Data)
    sub.vs, sub.band = views.vs, views.band
    sub.X, sub.C = views.X[:300], views.C[:300]
    runs = [classify(sub, 4, schedule(4, 25, iters=2), seed=7) for _ in range(2)]
    np.testing.assert_array_equal(runs[0][1].cls, runs[1][1].cls)
    np.testing.assert_array_equal(runs[0][1].psi, runs[1][1].psi)
    np.testing.assert_array_equal(runs[0][0].refs, runs[1][0].refs)


def test_t7_noise_model() -> None:
    """T7: on pure noise the estimated sigma2(r) after the full iteration is within 3% of the
    analytic D^2 s^2 / 2 in shells with >= 50 pixels (full plane)."""
    rng = np.random.default_rng(5)
    s2 = 2.0
    N = 400
    imgs = rng.normal(0, np.sqrt(s2), (N, DW, DW)).astype(np.float32)
    band = Band(DW, R_MAX)
    X = band.gather(rfft2c(imgs))
    C = np.ones((N, band.n), np.float32)
    clf = c2.Classifier2D(settings(2), np)
    em = c2.OnlineEM(clf, schedule(2, 100, iters=2), N, 0)
    em.seed_classes(lambda idx: (X[idx], C[idx]))
    for t in range(2):
        em.oem_iteration(t, lambda idx: (X[idx], C[idx]))
    em.full_iteration([(np.arange(N), X, C)])
    npix = 2 * np.bincount(band.shell, weights=band.weight, minlength=band.n_shells)  # full plane
    sel = npix >= 50
    rel = clf.sigma2[sel] / (DW * DW * s2 / 2) - 1
    print("T7 relative sigma2 error per shell", np.round(rel, 4))
    assert np.all(np.abs(rel) <= 0.03)


def test_shift_sign(views: Data) -> None:
    """An image shifted by +t (content moves by +t) is found at shift +t by the E-step."""
    clf = c2.Classifier2D(settings(1, recenter=False), np)
    img = fourier_crop(views.vs.views[:1], DW, ndim=2)
    clf.refs = img.astype(np.float32)
    band = clf.band
    F = band.gather(rfft2c(img)) * shift_phase(DW, np.array([[2.0, -1.0]]), band)
    e = clf.expectation(F.astype(np.complex64), np.ones((1, band.n), np.float32),
                        np.array([0.0, 90.0, 180.0, 270.0]))
    assert e.psi_index[0, 0] == 0
    np.testing.assert_allclose(e.shift[0, 0], [2.0, -1.0], atol=0.05)


# -- capacity constraint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def dominant() -> Data:
    return Data(simulate([600, 100, 100, 100, 100], D=D, pixel_size=A, snr=SNR, seed=4, max_corr=0.7))


def _minority_recovery(out, view: np.ndarray, K: int) -> float:
    maj = majority(out.cls, view, K)
    minority = view != 0
    return float(np.mean(maj[out.cls[minority]] == view[minority]))


def test_cap(dominant: Data) -> None:
    """One view with 60% of the particles, K = 10, cap 15%: no class exceeds the cap; the
    minority views are recovered at least as well as without the cap."""
    N = dominant.X.shape[0]
    cap = int(0.15 * N)
    _, capped = classify(dominant, 10, schedule(10, 30, max_per_class=cap))
    _, free = classify(dominant, 10, schedule(10, 30))
    sizes = np.bincount(capped.cls, minlength=10)
    rec_cap = _minority_recovery(capped, dominant.vs.view, 10)
    rec_free = _minority_recovery(free, dominant.vs.view, 10)
    print(f"cap: sizes {sorted(sizes)[::-1]}, free sizes {sorted(np.bincount(free.cls, minlength=10))[::-1]}"
          f"; minority recovery capped {rec_cap:.4f} free {rec_free:.4f}")
    assert sizes.max() <= cap
    assert rec_cap >= rec_free - 0.01
    assert set(majority(capped.cls, dominant.vs.view, 10)) >= {1, 2, 3, 4}


def test_marginalisation_recovers_views(views: Data) -> None:
    """Marginalisation over poses (force_max=False) on 5 of the views, K = 5: ARI >= 0.95 and
    soft pose posteriors (median pose ESS > 1) in the final pass."""
    keep = np.flatnonzero(views.vs.view < 5)
    sub = Data.__new__(Data)
    sub.vs, sub.band = views.vs, views.band
    sub.X, sub.C = views.X[keep], views.C[keep]
    _, out = classify(sub, 5, schedule(5, 60, iters=10), force_max=False)
    score = ari(out.cls, views.vs.view[keep])
    print(f"marginal K=5 ARI {score:.4f}, median pose ESS {np.median(out.pose_ess):.2f}")
    assert score >= 0.95
    assert np.median(out.pose_ess) > 1.0


# -- junk and annealing (§3.5 T4, T5; issue: sigma annealing absorbs low-contrast junk) ------


def _class_table(cls: np.ndarray, labels: np.ndarray, K: int) -> np.ndarray:
    M = np.zeros((K, labels.max() + 1), int)
    np.add.at(M, (cls, labels), 1)
    return M


def test_t4_junk(views: Data) -> None:
    """T4: 20% junk (random blobs at the particles' signal level), K = 12: >= 90% of the junk
    lands in classes with < 10% good particles; <= 5% of the good particles land there."""
    vs = add_junk(views.vs, blob_images(250, D, np.random.default_rng(1), 14.0), 1.0, seed=2)
    _, out = classify(Data(vs), 12, schedule(12, 40))
    M = _class_table(out.cls, vs.view, 12)
    junk_class = M[:, :10].sum(1) < 0.1 * np.maximum(M.sum(1), 1)
    junk = vs.view == 10
    in_junk = junk_class[out.cls]
    print(f"T4 junk in junk classes {in_junk[junk].mean():.3f}, good in junk classes {in_junk[~junk].mean():.3f}")
    assert in_junk[junk].mean() >= 0.9
    assert in_junk[~junk].mean() <= 0.05


def test_t5_annealing_ablation() -> None:
    """T5: two views with aligned correlation 0.9 among 4; ICUF 2 yields at least as many
    distinct good classes (views that are the majority of a class) as ICUF 1, per seed."""
    vs = simulate([150] * 4, D=D, pixel_size=A, snr=SNR, seed=8, twin_corr=0.9)
    data = Data(vs)
    for seed in (0, 1):
        n = {}
        for icuf in (1.0, 2.0):
            _, out = classify(data, 4, schedule(4, 60, icuf=icuf), seed=seed)
            maj = majority(out.cls, vs.view, 4)
            n[icuf] = len(set(maj[maj >= 0]))
        print(f"T5 seed {seed}: distinct good classes ICUF 1 {n[1.0]}, ICUF 2 {n[2.0]}")
        assert n[2.0] >= n[1.0]


@pytest.mark.slow
def test_sigma_annealing_off_keeps_low_contrast_junk() -> None:
    """The seed's report: 10% low-contrast junk ("gold edges" at 0.4 x the particles' signal)
    beside a dominant view (50%), K = 5 (4 views + 1 spare). A junk class survives (>= 90%
    junk, holding >= half of it) in every seed with sigma annealing off, and in fewer seeds
    with the default annealing, where the junk is absorbed into a good class instead."""
    vs = simulate([500, 150, 150, 100], D=D, pixel_size=A, snr=SNR, seed=4, max_corr=0.7)
    vs = add_junk(vs, edge_images(100, D, np.random.default_rng(1)), 0.4, seed=2)
    data = Data(vs)
    survived = {}
    for anneal in (True, False):
        hits = []
        for seed in range(4):
            _, out = classify(data, 5, schedule(5, 60, anneal=anneal), seed=seed)
            M = _class_table(out.cls, vs.view, 5)
            k = int(M[:, 4].argmax())
            hits.append(bool(M[k, 4] >= 50 and M[k, 4] >= 0.9 * M[k].sum()))
        survived[anneal] = hits
    print(f"junk class survives: annealing on {survived[True]}, off {survived[False]}")
    assert all(survived[False])
    assert sum(survived[True]) < sum(survived[False])


@pytest.mark.gpu
def test_gpu_estep_parity_with_numpy(views: Data) -> None:
    """T6 on the device: the same batch gives the same best classes and poses on CuPy."""
    from kernels import backend

    if not backend.cupy_available():
        pytest.skip("CuPy with a usable GPU is not available")
    import cupy

    rng = np.random.default_rng(2)
    out = []
    for xp in (np, cupy):
        clf = c2.Classifier2D(settings(4), xp)
        clf.refs = xp.asarray(rng.normal(size=(4, DW, DW)).astype(np.float32)) if xp is np else \
            cupy.asarray(out[0][0])
        e = clf.expectation(xp.asarray(views.X[:200]), xp.asarray(views.C[:200]), c2.psi_grid(clf.s))
        out.append((backend.to_host(clf.refs), backend.to_host(e.loglik).argmax(1), backend.to_host(e.psi_index)))
    assert np.mean(out[0][1] == out[1][1]) >= 0.995
    assert np.mean(out[0][2] == out[1][2]) >= 0.99
