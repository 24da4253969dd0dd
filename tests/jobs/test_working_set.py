"""WorkingSet: the pre-read working-box transforms give the values of a plain read and are not read
again (also by ``stream``), and a set too large for the memory budget is read in every pass."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import working_set as ws
from jobs.import_particles import JOB as IMPORT
from jobs.particles import read_tables
from kernels.fourier import Band, rfft2c


@pytest.fixture
def imported(particles_data, run_job, pio, tmp_path):
    """(ParticleSet, tables, JobContext) of the 50 conftest particles imported as they are."""
    star = pio.write_star31(particles_data.root / "particles.star", particles_data)
    ps = run_job(IMPORT, {"star_path": str(star), "normalize": False}, name="import")["particles"]
    return ps, read_tables(ps, tmp_path), pio.job_context(tmp_path, "consumer")


@pytest.mark.parametrize("budget", [1 << 40, 1], ids=["pre-read", "streamed"])
def test_load_equals_plain_read(imported, monkeypatch, budget: int) -> None:
    ps, tables, ctx = imported
    monkeypatch.setattr(ws, "memory_budget_bytes", lambda fraction: budget)
    src = ws.WorkingSet(ps, tables, ctx, 20, ps.box * ps.pixel_size / 20, np)
    assert (src._fts is not None) == (budget > 1)
    band = Band(20, 8)
    rng = np.random.default_rng(0)
    for idx in (np.array([3, 41, 7, 3]), rng.permutation(ps.count)[:30], np.arange(ps.count)):
        X, C = src.load(idx, band)
        plain = band.gather(rfft2c(src.images(idx).astype(np.float32)))
        np.testing.assert_array_equal(X, plain)
        np.testing.assert_array_equal(C, src.ctf(idx, band))
    assert src._read.sum() == (ps.count if budget > 1 else 0)
    reads = []
    read = src.images
    monkeypatch.setattr(src, "images", lambda idx: reads.append(len(idx)) or read(idx))
    src.load(np.arange(ps.count), band)
    assert reads == ([] if budget > 1 else [ps.count])
    idx, X, C = (np.concatenate(parts) for parts in zip(*src.stream(17, band), strict=True))
    np.testing.assert_array_equal(idx, np.arange(ps.count))
    np.testing.assert_array_equal(X, plain)
    np.testing.assert_array_equal(C, src.ctf(idx, band))
