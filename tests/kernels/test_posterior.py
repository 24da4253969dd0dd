"""Streaming reducers (kernels/posterior.py): U10, top-K, chunk invariance, groups, M-step sums."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from kernels.fourier import Band
from kernels.posterior import (
    ArgMax,
    ArgMin,
    Logits,
    LogSumExp,
    MarginalSums,
    TopK,
    class_posteriors,
    ess,
    posterior_weights,
    significant,
)
from kernels.reconstruction import Accumulator3D
from kernels.rotations import random_rotations
from kernels.scoring import particle_phases, prepare_particles, score_direct, stream


def _feed(reducers: list, diff2: np.ndarray, chunk: int) -> None:
    for r0 in range(0, diff2.shape[2], chunk):
        d = np.ascontiguousarray(diff2[:, :, r0 : r0 + chunk])
        for red in reducers:
            red.update(d, r0)


def test_u10_streaming_logsumexp_and_weights() -> None:
    """U10: 1e6 float32 scores spanning 1e4 nats; chunked LSE vs float64 direct <= 1e-4 nats,
    weights within 1e-5."""
    rng = np.random.default_rng(10)
    B, T, R = 4, 10, 25_000
    offsets = np.array([-5.0e4, -1.0e5, 0.0, 3.0e3])[:, None, None]
    scores = (offsets - 1.0e4 * rng.uniform(0.0, 1.0, (B, T, R)) ** 3).astype(np.float32)
    lse = LogSumExp()
    _feed([lse], -scores, 1_000)
    s64 = scores.astype(np.float64).reshape(B, -1)
    ref = logsumexp(s64, axis=1)
    assert np.abs(lse.lse - ref).max() <= 1e-4, np.abs(lse.lse - ref).max()
    w = posterior_weights(scores, lse.lse)
    w_ref = np.exp(s64 - ref[:, None]).reshape(B, T, R)
    assert np.abs(w - w_ref).max() <= 1e-5, np.abs(w - w_ref).max()
    ess_ref = 1.0 / (w_ref.reshape(B, -1) ** 2).sum(axis=1)
    np.testing.assert_allclose(lse.ess, ess_ref, rtol=1e-4)


def _random_diff2(seed: int, B: int = 5, T: int = 6, R: int = 37) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1e3 + 30.0 * rng.standard_normal((B, T, R))).astype(np.float32)


def test_topk_equals_sorting() -> None:
    d = _random_diff2(1)
    B, T, R = d.shape
    logits = Logits(temperature=2.0, log_prior_t=np.linspace(0, -1, T))
    top = TopK(10, logits)
    _feed([top], d, 4)
    full = (-d / 2.0 + np.linspace(0, -1, T)[None, :, None]).reshape(B, -1)
    order = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_allclose(top.values, np.take_along_axis(full, order, axis=1), rtol=1e-6)
    np.testing.assert_array_equal(top.shift, order // R)
    np.testing.assert_array_equal(top.ref, order % R)


def test_argmin_argmax_match_direct() -> None:
    d = _random_diff2(2)
    B, T, R = d.shape
    prior_r = np.random.default_rng(0).normal(size=(B, R))
    amin, amax = ArgMin(), ArgMax(Logits(log_prior_r=prior_r))
    _feed([amin, amax], d, 5)
    flat = d.reshape(B, -1)
    i = flat.argmin(axis=1)
    np.testing.assert_array_equal(amin.score, flat.min(axis=1))
    np.testing.assert_array_equal(amin.ref, i % R)
    np.testing.assert_array_equal(amin.shift, i // R)
    lp = (-d + prior_r[:, None, :].astype(np.float32)).reshape(B, -1)
    np.testing.assert_array_equal(amax.ref, lp.argmax(axis=1) % R)
    np.testing.assert_array_equal(amax.shift, lp.argmax(axis=1) // R)


@pytest.mark.parametrize("chunk", [1, 3, 8, 37])
def test_reducers_are_chunk_size_invariant(chunk: int) -> None:
    d = _random_diff2(3)
    groups = np.repeat(np.arange(3), [10, 15, 12])
    logits = Logits(temperature=4.0, log_prior_t=np.linspace(0, -2, d.shape[1]))
    reds = [ArgMin(groups), ArgMax(logits), LogSumExp(logits, groups), TopK(7, logits)]
    whole = [ArgMin(groups), ArgMax(logits), LogSumExp(logits, groups), TopK(7, logits)]
    _feed(reds, d, chunk)
    _feed(whole, d, d.shape[2])
    for a, b in ((reds[0], whole[0]), (reds[1], whole[1])):
        np.testing.assert_array_equal(a.score, b.score)
        np.testing.assert_array_equal(a.ref, b.ref)
        np.testing.assert_array_equal(a.shift, b.shift)
    np.testing.assert_allclose(reds[2].lse, whole[2].lse, atol=1e-5, rtol=0)
    np.testing.assert_allclose(reds[2].ess, whole[2].ess, rtol=1e-5)
    np.testing.assert_array_equal(reds[3].values, whole[3].values)
    np.testing.assert_array_equal(reds[3].ref, whole[3].ref)


def test_groups_and_class_posteriors() -> None:
    d = _random_diff2(4) * np.float32(0.01)
    B, T, R = d.shape
    groups = np.random.default_rng(4).integers(0, 3, R)  # non-contiguous classes
    lse, best = LogSumExp(groups=groups), ArgMin(groups)
    _feed([lse, best], d, 6)
    l64 = -d.astype(np.float64)
    for k in range(3):
        np.testing.assert_allclose(lse.lse[:, k], logsumexp(l64[:, :, groups == k].reshape(B, -1),
                                                            axis=1), atol=1e-5)
        np.testing.assert_array_equal(best.score[:, k], d[:, :, groups == k].min(axis=(1, 2)))
        assert np.all(groups[best.ref[:, k]] == k)
    np.testing.assert_allclose(lse.total, logsumexp(l64.reshape(B, -1), axis=1), atol=1e-5)
    log_pi = np.log([0.5, 0.3, 0.2])
    p, class_ess = class_posteriors(lse.lse, log_pi)
    ref = lse.lse + log_pi
    ref = np.exp(ref - logsumexp(ref, axis=1, keepdims=True))
    np.testing.assert_allclose(p, ref, rtol=1e-10)
    np.testing.assert_allclose(class_ess, 1.0 / (ref**2).sum(axis=1), rtol=1e-10)
    assert np.all((class_ess >= 1.0) & (class_ess <= 3.0))


def test_ess_and_significant_weights() -> None:
    np.testing.assert_allclose(ess(np.ones((2, 8))), [8.0, 8.0])
    np.testing.assert_allclose(ess(np.array([[1.0, 0.0, 0.0]])), [1.0])
    w = np.array([[0.5, 0.3, 0.15, 0.0495, 0.0005], [0.9995, 0.0005, 0.0, 0.0, 0.0]])
    with np.errstate(divide="ignore"):
        mask = significant(np.log(w), np.zeros(2), 0.999)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    # top-k holding less than the fraction keeps all k
    np.testing.assert_array_equal(significant(np.log([[0.4, 0.3]]), np.zeros(1)), [[1, 1]])


def test_marginal_sums_equal_direct_and_feed_accumulator() -> None:
    rng = np.random.default_rng(9)
    band = Band(32, 10)
    nF, B, T, R = band.n, 4, 5, 12
    X = (rng.normal(size=(B, nF)) + 1j * rng.normal(size=(B, nF))).astype(np.complex64)
    P = (rng.normal(size=(R, nF)) + 1j * rng.normal(size=(R, nF))).astype(np.complex64)
    C = rng.uniform(-1, 1, (B, nF)).astype(np.float32)
    w = (band.weight * 0.05).astype(np.float32)  # weak signal: soft posteriors
    phases = particle_phases(band, rng.uniform(-2, 2, (T, 2)))
    particles = prepare_particles(X, C, w, phases)
    logits = Logits(temperature=3.0)
    lse = LogSumExp(logits)
    stream(particles, P, [lse], chunk=5)

    got_v = np.zeros((R, nF), np.complex128)
    got_w = np.zeros((R, nF))
    rotations = random_rotations(R, rng)
    acc = Accumulator3D(band.D)

    def sink(refs: np.ndarray, values: np.ndarray, weights: np.ndarray) -> None:
        got_v[refs] += values
        got_w[refs] += weights
        acc.insert(values, weights, rotations[refs], band)

    sums = MarginalSums(particles.Y, particles.ctf2w, lse.lse, sink, logits)
    stream(particles, P, [sums], chunk=5)

    d = score_direct(X, C, w, phases, P) / 3.0
    gamma = np.exp(-d - logsumexp(-d.reshape(B, -1), axis=1)[:, None, None])
    assert gamma.max() < 0.5  # genuinely marginal
    Xs = X[:, None, :] * phases[None] * (C * w)[:, None, :]
    ref_v = np.einsum("btr,btf->rf", gamma, Xs)
    ref_w = np.einsum("br,bf->rf", gamma.sum(axis=1), C.astype(np.float64) ** 2 * w)
    assert np.abs(got_v - ref_v).max() <= 1e-5 * np.abs(ref_v).max()
    assert np.abs(got_w - ref_w).max() <= 1e-5 * ref_w.max()
    np.testing.assert_allclose(sums.mass, 1.0, atol=1e-5)
    assert np.isclose(acc.weight.sum(), got_w.sum(), rtol=1e-5)


@pytest.mark.gpu
def test_gpu_reducers_parity_with_numpy() -> None:
    from kernels import backend

    if not backend.cupy_available():
        pytest.skip("CuPy with a usable GPU is not available")
    import cupy

    d = _random_diff2(6, B=8, T=9, R=200)
    groups = np.repeat(np.arange(4), 50)
    host = [ArgMin(groups), LogSumExp(groups=groups), TopK(5)]
    dev = [ArgMin(groups), LogSumExp(groups=groups), TopK(5)]
    _feed(host, d, 64)
    for r0 in range(0, d.shape[2], 64):
        for red in dev:
            red.update(cupy.asarray(d[:, :, r0 : r0 + 64]), r0)
    np.testing.assert_array_equal(cupy.asnumpy(dev[0].ref), host[0].ref)
    np.testing.assert_allclose(cupy.asnumpy(dev[1].lse), host[1].lse, atol=1e-5)
    np.testing.assert_array_equal(cupy.asnumpy(dev[2].ref), host[2].ref)
