"""Backend selection, host/device helpers, memory budget and a GPU parity check."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernels import backend
from kernels.fourier import Band, irfft2c, rfft2c, shift_images

needs_gpu = pytest.mark.skipif(not backend.cupy_available(), reason="CuPy/GPU unavailable")


def test_env_override_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_BACKEND", "numpy")
    assert backend.name() == "numpy"
    assert backend.get_xp() is np


def test_env_override_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_BACKEND", "torch")
    with pytest.raises(RuntimeError, match="numpy' or 'cupy"):
        backend.name()


@pytest.mark.skipif(backend.cupy_available(), reason="CuPy is usable here")
def test_cupy_requested_but_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="cupy requested but unavailable"):
        backend.name()


def test_default_matches_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRYODAG_BACKEND", raising=False)
    assert backend.name() == ("cupy" if backend.cupy_available() else "numpy")


def test_host_threads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_THREADS", "3")
    assert backend.host_threads() == 3
    monkeypatch.setenv("CRYODAG_THREADS", "0")
    with pytest.raises(RuntimeError, match="CRYODAG_THREADS must be a positive integer"):
        backend.host_threads()
    monkeypatch.delenv("CRYODAG_THREADS")
    assert backend.host_threads() == backend.usable_cpus() <= len(os.sched_getaffinity(0))


def test_cgroup_quota_caps_usable_cpus(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert backend.cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert backend.cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert backend.cgroup_cpu_quota(tmp_path / "v1") is None
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert backend.cgroup_cpu_quota(tmp_path / "v1") == 3.0
    assert backend.cgroup_cpu_quota(tmp_path / "none") is None
    monkeypatch.setattr(backend.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(backend, "cgroup_cpu_quota", lambda: 1.5)
    assert backend.usable_cpus() == 2
    monkeypatch.setattr(backend, "cgroup_cpu_quota", lambda: None)
    assert backend.usable_cpus() == 64


def test_batch_slices_cover_range_and_feed_every_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_THREADS", "4")
    sl = backend.batch_slices(10, 100, np)
    assert len(sl) == 4 and [i for s in sl for i in range(s.start, s.stop)] == list(range(10))
    assert [s.stop - s.start for s in backend.batch_slices(10, 2, np)] == [2] * 5
    seen = np.zeros(10, int)

    def mark(s: slice) -> None:
        seen[s] += 1

    backend.map_batches(mark, sl, np)
    assert (seen == 1).all()


def test_in_order_turns_follow_slice_order_and_survive_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turns are taken in slice order whatever the threads do first; a slice that raises
    before its turn releases it (no hang) and the error reaches the caller."""
    import time

    monkeypatch.setenv("CRYODAG_THREADS", "3")
    slices = backend.batch_slices(6, 1, np)
    order = backend.InOrder(slices)
    taken: list[int] = []

    def work(sl: slice) -> None:
        time.sleep(0.01 * (6 - sl.start))  # later slices are ready first
        with order.turn(sl):
            taken.append(sl.start)

    backend.map_batches(work, slices, np, order)
    assert taken == list(range(6))
    order = backend.InOrder(slices)

    def fail_first(sl: slice) -> None:
        if sl.start == 0:
            raise ValueError("slice 0")
        with order.turn(sl):
            pass

    with pytest.raises(ValueError, match="slice 0"):
        backend.map_batches(fail_first, slices, np, order)


def test_tf32_disabled_after_probe() -> None:
    backend.cupy_available()
    assert os.environ["NVIDIA_TF32_OVERRIDE"] == "0"
    assert os.environ["CUPY_TF32"] == "0"


def test_xp_of_and_transfers() -> None:
    a = np.arange(6.0).reshape(2, 3)
    assert backend.xp_of(a, [1, 2], 3.0) is np
    h = backend.to_host(backend.to_device(a, np))
    np.testing.assert_array_equal(h, a)
    assert isinstance(backend.to_host([1, 2]), np.ndarray)


def test_memory_budget_and_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYODAG_BACKEND", "numpy")
    b1 = backend.memory_budget_bytes(0.1)
    b2 = backend.memory_budget_bytes(0.2)
    assert b1 > 0
    assert 1.5 < b2 / b1 < 2.5  # available RAM fluctuates a little between the calls
    assert backend.batch_size_for(1 << 60) == 1
    assert backend.batch_size_for(1 << 60, minimum=4) == 4
    assert backend.batch_size_for(8, maximum=100) == 100
    with pytest.raises(ValueError):
        backend.memory_budget_bytes(0.0)
    with pytest.raises(ValueError):
        backend.batch_size_for(0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_parity_fourier_and_gemm() -> None:
    import cupy as cp

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 64)).astype(np.float32)
    t = rng.uniform(-3, 3, (4, 2))
    xg = cp.asarray(x)
    assert backend.xp_of(xg, x) is cp
    F_cpu, F_gpu = rfft2c(x), rfft2c(xg)
    assert float(np.abs(backend.to_host(F_gpu) - F_cpu).max()) < 1e-4 * np.abs(F_cpu).max()
    np.testing.assert_allclose(backend.to_host(irfft2c(F_gpu, 64)), x, atol=1e-5)
    np.testing.assert_allclose(
        backend.to_host(shift_images(xg, cp.asarray(t))), shift_images(x, t), atol=1e-4
    )
    band = Band(64, 20)
    np.testing.assert_allclose(backend.to_host(band.gather(F_gpu)), band.gather(F_cpu), atol=1e-3)
    # TF32 guard (algorithms.md §10.8): float32 GEMM vs float64 reference
    a = rng.standard_normal((512, 256)).astype(np.float32)
    b = rng.standard_normal((256, 512)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    got = backend.to_host(cp.asarray(a) @ cp.asarray(b))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6
