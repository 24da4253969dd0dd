"""GPU leases: a job that declares `gpu=True` runs with one device to itself.

Devices are counted once per process (`CRYODAG_GPUS` overrides: a number, or 0 for none) and
leased through exclusive file locks under `<project>/.locks/`, so concurrent jobs of one run,
of several runs, or of several Dask workers on one host never share a device. The child gets
`CUDA_VISIBLE_DEVICES` set to its device. Prefect counts concurrency; it does not assign GPUs.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_S = 0.5


@functools.cache
def device_count() -> int:
    """Number of usable GPUs: CRYODAG_GPUS, else `nvidia-smi -L`, else 0."""
    env = os.environ.get("CRYODAG_GPUS")
    if env is not None:
        return max(int(env), 0)
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@contextmanager
def lease(project: Path, wanted: bool) -> Iterator[dict[str, str]]:
    """Hold a free device while the block runs; yields the child's extra environment.

    Without `wanted` or without GPUs it yields {} at once. Otherwise it waits for a device.
    """
    n = device_count()
    if not wanted or n == 0:
        yield {}
        return
    locks = project / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(n):
            f = open(locks / f"gpu{i}.lock", "w")  # noqa: SIM115 - held for the job's lifetime
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield {"CUDA_VISIBLE_DEVICES": str(i)}
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(POLL_S)
