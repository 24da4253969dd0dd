"""GEMM scoring (kernels/scoring.py): parity with the direct loop, pose recovery, U11 TF32 guard."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import backend
from kernels.ctf import ctf_2d
from kernels.fourier import Band, lowpass, shift_phase
from kernels.posterior import ArgMin
from kernels.projection import prepare_volume, project
from kernels.rotations import random_rotations
from kernels.scoring import (
    diff2_chunk,
    particle_phases,
    prepare_particles,
    ref_chunk_size,
    score_direct,
    stream,
)


def _cplx(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _case(rng: np.random.Generator, D: int, r_max: float, B: int, T: int, R: int):
    band = Band(D, r_max)
    nF = band.n
    X = _cplx(rng, B, nF)
    P = _cplx(rng, R, nF)
    C = rng.uniform(-1.0, 1.0, (B, nF)).astype(np.float32)
    w = (band.weight * rng.uniform(0.5, 2.0, nF)).astype(np.float32)
    phases = particle_phases(band, rng.uniform(-4.0, 4.0, (T, 2)))
    return band, X, C, w, phases, P


@pytest.mark.parametrize(("D", "r_max", "B", "T", "R"), [(32, 10, 3, 5, 7), (48, 20, 4, 9, 11)])
def test_gemm_equals_direct_loop(D: int, r_max: float, B: int, T: int, R: int) -> None:
    rng = np.random.default_rng(D + B)
    _, X, C, w, phases, P = _case(rng, D, r_max, B, T, R)
    gemm = diff2_chunk(prepare_particles(X, C, w, phases), P)
    direct = score_direct(X, C, w, phases, P)
    assert gemm.shape == (B, T, R) and gemm.dtype == np.float32
    rel = np.abs(gemm - direct) / np.abs(direct)
    assert rel.max() <= 1e-5, rel.max()


def test_particle_phases_undo_shift() -> None:
    band = Band(32, 12)
    rng = np.random.default_rng(1)
    P = _cplx(rng, 1, band.n)
    t = np.array([[2.5, -1.25]])
    X = P * shift_phase(band.D, t, band)
    C = np.ones((1, band.n), np.float32)
    d = score_direct(X, C, band.weight, particle_phases(band, t), P)
    half_norm = 0.5 * np.sum(band.weight * np.abs(X) ** 2)
    assert abs(d[0, 0, 0]) < 1e-10 * half_norm


def _smooth_volume(D: int, rng: np.random.Generator) -> np.ndarray:
    vol = lowpass(rng.normal(size=(D, D, D)).astype(np.float32), D / 6, ndim=3)
    r = np.linalg.norm(np.indices((D, D, D)) - D // 2, axis=0)
    return (vol * (r < 0.4 * D)).astype(np.float32)


def test_noiseless_pose_and_shift_recovered_from_projections() -> None:
    D, B = 32, 12
    rng = np.random.default_rng(7)
    band = Band(D, D // 2 - 2)
    rotations = random_rotations(300, rng)
    vft = prepare_volume(_smooth_volume(D, rng))
    grid = np.array([(x, y) for y in (-1.5, 0.0, 1.5) for x in (-1.5, 0.0, 1.5)])
    true_r = rng.choice(len(rotations), B, replace=False)
    true_t = rng.integers(0, len(grid), B)
    defocus = rng.uniform(8000.0, 25000.0, B)
    C = ctf_2d(D, 2.0, defocus, defocus + 300.0, rng.uniform(0, 180, B), voltage_kv=300.0,
               cs_mm=2.7, amplitude_contrast=0.1, band=band)
    X = C * project(vft, rotations[true_r], band) * shift_phase(D, grid[true_t], band)
    inv_sigma2 = band.weight.astype(np.float32)
    particles = prepare_particles(X, C, inv_sigma2, particle_phases(band, grid))

    best = ArgMin()
    stream(particles, lambda r0, r1: project(vft, rotations[r0:r1], band),
           [best], n_refs=len(rotations), chunk=64)
    np.testing.assert_array_equal(best.ref, true_r)
    np.testing.assert_array_equal(best.shift, true_t)
    assert np.all(np.abs(best.score) <= 1e-4 * particles.half_norm)


def test_u11_float32_gemm_matches_float64_no_tf32() -> None:
    """U11 / §10.8: a big cross term (matched particles, nF ~ 1,500) in float32 on the selected
    backend agrees with float64 to 1e-6 relative; TF32 would give ~1e-4."""
    xp = backend.get_xp()
    rng = np.random.default_rng(11)
    band = Band(64, 31)
    nF, B, R = band.n, 64, 64
    P = _cplx(rng, R, nF)
    C = rng.uniform(0.2, 1.0, (B, nF)).astype(np.float32)
    X = C * P[:B] + 0.1 * _cplx(rng, B, nF)
    w = band.weight.astype(np.float32)
    particles = prepare_particles(*(xp.asarray(a) for a in (X, C, w, np.ones((1, nF)))))
    Pcat = np.concatenate([P.real, P.imag], axis=1).astype(np.float32)
    cross32 = backend.to_host(particles.Y @ xp.asarray(Pcat).T)
    cross64 = backend.to_host(particles.Y).astype(np.float64) @ Pcat.astype(np.float64).T
    diag = np.diagonal(cross64)
    assert diag.min() > 1e3
    rel = np.abs(np.diagonal(cross32) - diag) / diag
    assert rel.max() <= 1e-6, rel.max()
    assert np.abs(cross32 - cross64).max() <= 1e-6 * diag.max()
    # the guard can fail: inputs rounded to TF32's 10-bit mantissa miss it by far
    tf32 = lambda a: (a.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)  # noqa: E731
    cross_tf32 = tf32(backend.to_host(particles.Y)).astype(np.float64) @ tf32(Pcat).T
    assert (np.abs(np.diagonal(cross_tf32) - diag) / diag).max() > 1e-5


def test_callable_refs_and_default_chunk_equal_array_path() -> None:
    rng = np.random.default_rng(3)
    _, X, C, w, phases, P = _case(rng, 32, 12, 5, 4, 40)
    particles = prepare_particles(X, C, w, phases)
    a, b = ArgMin(), ArgMin()
    stream(particles, P, [a])
    stream(particles, lambda r0, r1: P[r0:r1], [b], n_refs=len(P), chunk=6)
    np.testing.assert_array_equal(a.ref, b.ref)
    np.testing.assert_array_equal(a.score, b.score)
    with pytest.raises(ValueError, match="n_refs"):
        stream(particles, lambda r0, r1: P[r0:r1], [a])


def test_ref_chunk_size_respects_budget() -> None:
    B, T, nF = 128, 81, 2500
    budget = 350_000_000
    rc = ref_chunk_size(B, T, nF, 10**6, budget)
    used = lambda r: B * T * nF * 8 + r * nF * 8 + B * T * r * 4  # noqa: E731
    assert used(rc) <= budget < used(rc + 1)
    assert ref_chunk_size(B, T, nF, 100, budget) == 100
    assert ref_chunk_size(B, T, nF, 100, 1) == 1


@pytest.mark.gpu
def test_gpu_scoring_parity_with_numpy() -> None:
    if not backend.cupy_available():
        pytest.skip("CuPy with a usable GPU is not available")
    import cupy

    rng = np.random.default_rng(5)
    _, X, C, w, phases, P = _case(rng, 64, 24, 16, 9, 50)
    ref = diff2_chunk(prepare_particles(X, C, w, phases), P)
    dev = diff2_chunk(prepare_particles(*(cupy.asarray(a) for a in (X, C, w, phases))),
                      cupy.asarray(P))
    rel = np.abs(cupy.asnumpy(dev) - ref) / np.abs(ref)
    assert rel.max() <= 1e-5, rel.max()
