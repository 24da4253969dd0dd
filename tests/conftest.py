"""Settings for every test session: offline Prefect, the NumPy backend, one thread per `pytest -n`
worker, the worker count of `-n auto`, and the order in which files reach the workers."""

from __future__ import annotations

import os
from collections import Counter

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("CRYODAG_BACKEND", "numpy")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one worker per core (pytest -n): each single-threaded
    for _name in ("CRYODAG_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``pytest -n auto``: ``backend.usable_cpus()`` (affinity and cgroup CPU quota), not
    xdist's count of physical cores, which ignores a container's CPU quota."""
    from kernels.backend import usable_cpus

    return usable_cpus()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with more `slow` tests first (stable otherwise): ``pytest -n --dist loadfile`` hands
    files to the workers in this order, and the longest first keeps their finishing times close."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])
