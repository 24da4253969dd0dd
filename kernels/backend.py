"""Array backend selection: CuPy on a usable GPU, NumPy otherwise.

``CRYODAG_BACKEND=numpy|cupy`` overrides the automatic choice; asking for ``cupy`` when
CuPy or a GPU is unavailable raises ``RuntimeError``.

TF32 policy (algorithms.md §10.8): float32 GEMMs must not run in TF32. Before CuPy is
imported this module sets ``NVIDIA_TF32_OVERRIDE=0`` (disables TF32 in cuBLAS/cuFFT/cuDNN)
and ``CUPY_TF32=0`` (CuPy only selects the TF32 cuBLAS compute type when it is > 0). If
CuPy was already imported with ``CUPY_TF32`` set to a non-zero value, selecting the CuPy
backend raises ``RuntimeError`` instead of silently computing in TF32.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

_ENV = "CRYODAG_BACKEND"
_THREADS_ENV = "CRYODAG_THREADS"


def _disable_tf32() -> None:
    """Force TF32 off for NVIDIA libraries and CuPy (must run before CuPy is imported)."""
    if "cupy" in sys.modules and os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise RuntimeError(
            "CuPy was imported with CUPY_TF32 enabled; float32 GEMMs would run in TF32. "
            "Unset CUPY_TF32 before importing CuPy."
        )
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    os.environ["CUPY_TF32"] = "0"


@functools.lru_cache(maxsize=1)
def _cupy_or_reason() -> tuple[ModuleType | None, str]:
    """Import CuPy if it is installed and sees at least one device; else (None, reason)."""
    _disable_tf32()
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy is not importable ({exc})"
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver/runtime errors have several types
        return None, f"CuPy found no usable CUDA device ({exc})"
    if n_devices < 1:
        return None, "CuPy found no CUDA device"
    return cupy, ""


def cupy_available() -> bool:
    """True when CuPy is importable and a CUDA device is usable."""
    return _cupy_or_reason()[0] is not None


def name() -> str:
    """Selected backend: "numpy" or "cupy" (env CRYODAG_BACKEND overrides)."""
    requested = os.environ.get(_ENV, "").strip().lower()
    if requested == "numpy":
        return "numpy"
    if requested == "cupy":
        cupy, reason = _cupy_or_reason()
        if cupy is None:
            raise RuntimeError(f"{_ENV}=cupy requested but unavailable: {reason}")
        return "cupy"
    if requested:
        raise RuntimeError(f"{_ENV} must be 'numpy' or 'cupy', got {requested!r}")
    return "cupy" if cupy_available() else "numpy"


def get_xp() -> ModuleType:
    """Array module of the selected backend (numpy or cupy)."""
    if name() == "cupy":
        return _cupy_or_reason()[0]
    return np


def _is_cupy_array(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def xp_of(*arrays: Any) -> ModuleType:
    """Array module of the given arrays: cupy if any of them is a CuPy array, else numpy."""
    for a in arrays:
        if _is_cupy_array(a):
            return sys.modules["cupy"]
    return np


def to_host(a: Any) -> np.ndarray:
    """Copy (if needed) to a NumPy array on the host."""
    if _is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def to_device(a: Any, xp: ModuleType | None = None) -> Any:
    """Array on the backend ``xp`` (default: the selected backend)."""
    xp = get_xp() if xp is None else xp
    if xp is np:
        return to_host(a)
    return xp.asarray(a)


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def memory_budget_bytes(fraction: float = 0.25) -> int:
    """``fraction`` of free GPU memory (cupy backend) or of available RAM (numpy backend)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if name() == "cupy":
        cupy = _cupy_or_reason()[0]
        free, _total = cupy.cuda.Device().mem_info
        # memory cached by CuPy's pool is reusable by this process
        free += cupy.get_default_memory_pool().free_bytes()
    else:
        free = _available_ram_bytes()
    return int(free * fraction)


def batch_size_for(
    bytes_per_item: int, fraction: float = 0.25, minimum: int = 1, maximum: int | None = None
) -> int:
    """Items per batch fitting in memory_budget_bytes(fraction), clipped to [minimum, maximum]."""
    if bytes_per_item <= 0:
        raise ValueError(f"bytes_per_item must be positive, got {bytes_per_item}")
    n = memory_budget_bytes(fraction) // int(bytes_per_item)
    if maximum is not None:
        n = min(n, maximum)
    return int(max(n, minimum))


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu/cpu.cfs_quota_us`` over
    ``cfs_period_us``) under root; None without a quota or a readable cgroup."""
    try:
        if (root / "cpu.max").is_file():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may keep busy: those it may run on (affinity), capped by the cgroup CPU
    quota rounded up (a container limited to 2 CPUs on a 64-core host counts 2)."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota()
    return max(1, cpus if quota is None else min(cpus, math.ceil(quota)))


def host_threads() -> int:
    """Threads for host (NumPy) batch loops: ``CRYODAG_THREADS`` or ``usable_cpus()`` (NumPy
    releases the GIL in the gathers, element-wise maths and GEMMs of a batch)."""
    raw = os.environ.get(_THREADS_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise RuntimeError(f"{_THREADS_ENV} must be a positive integer, got {raw!r}")
        return int(raw)
    return usable_cpus()


def batch_slices(n: int, step: int, xp: ModuleType) -> list[slice]:
    """Consecutive slices of range(n) of at most ``step`` items; on NumPy at least
    ``host_threads()`` of them when n allows (so ``map_batches`` keeps every thread busy)."""
    if xp is np:
        step = min(step, -(-n // host_threads()))
    step = max(int(step), 1)
    return [slice(b, min(b + step, n)) for b in range(0, n, step)]


def map_batches(fn: Callable[[slice], None], slices: list[slice], xp: ModuleType,
                order: InOrder | None = None) -> None:
    """fn(sl) for every slice: in ``host_threads()`` threads on NumPy, in order on CuPy (one
    stream). fn must write only its own rows of shared outputs, or add to shared sums inside
    ``order.turn(sl)`` (each slice's turn is released when fn returns or raises)."""
    def call(sl: slice) -> None:
        try:
            fn(sl)
        finally:
            if order is not None:
                order.release(sl)

    threads = min(host_threads(), len(slices)) if xp is np else 1
    if threads <= 1:
        for sl in slices:
            call(sl)
        return
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(call, slices):
            pass


class InOrder:
    """Turns for the slices of one ``map_batches`` run: inside ``turn(sl)`` slice i runs only
    after slice i-1 left its turn, so work before the turn runs in parallel and sums into
    shared accumulators are always taken in the same order (a run reproduces itself bit for
    bit). ``index(sl)`` is the slice's position (for per-slice results)."""

    def __init__(self, slices: list[slice]) -> None:
        self.slices = slices
        self._index = {sl.start: i for i, sl in enumerate(slices)}
        self._done = [threading.Event() for _ in slices]

    def index(self, sl: slice) -> int:
        return self._index[sl.start]

    def release(self, sl: slice) -> None:
        """Let the next slice take its turn."""
        self._done[self._index[sl.start]].set()

    @contextmanager
    def turn(self, sl: slice) -> Iterator[None]:
        i = self._index[sl.start]
        if i:
            self._done[i - 1].wait()
        try:
            yield
        finally:
            self.release(sl)
