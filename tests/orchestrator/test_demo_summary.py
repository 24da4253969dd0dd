"""demo_summary: truth rows found by micrograph and coordinates, ARI and latent correlation per job
output, on the `tiny` simulated preset (states and t replaced by synthetic labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jobs.artifacts import ParticleSet
from jobs.io.star import ParticleTables, read_particles_star, write_particles_star
from jobs.particles import read_tables
from jobs.simulated_dataset import write_preset
from orchestrator import demo_summary as ds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ParticleTables, ds.Truth]:
    root = tmp_path_factory.mktemp("tiny")
    write_preset("tiny", root / "demo_source")
    source = root / "demo_source"
    truth = ds.Truth.load(source)
    rng = np.random.default_rng(0)
    truth.state = np.where(truth.kind == 0, rng.integers(0, 3, truth.kind.size), -1)
    truth.t = rng.uniform(-1, 1, truth.kind.size)
    return root, read_particles_star(source / "particles.star"), truth


def _set(root: Path, tables: ParticleTables, df: pd.DataFrame, name: str) -> ParticleSet:
    write_particles_star(root / name, ParticleTables(tables.optics, df, root / name))
    return ParticleSet(star=name, stacks=[], count=len(df), box=32, pixel_size=6.0)


def test_rows_match_shuffled_subset(dataset: tuple[Path, ParticleTables, ds.Truth]) -> None:
    root, tables, truth = dataset
    pick = np.random.default_rng(1).permutation(len(tables))[:100]
    ps = _set(root, tables, tables.particles.iloc[pick].reset_index(drop=True), "subset.star")
    np.testing.assert_array_equal(truth.rows(read_tables(ps, root).particles), pick)
    junk = int(np.sum(truth.kind[pick] > 0))
    assert ds._junk_line(np.arange(len(tables)), pick, truth).startswith(f"kept 100 of {len(tables)}: junk ")
    assert f"-> {junk} (" in ds._junk_line(np.arange(len(tables)), pick, truth)


def test_classes_and_latents(dataset: tuple[Path, ParticleTables, ds.Truth]) -> None:
    root, tables, truth = dataset
    rows = np.arange(len(tables))
    noise = np.random.default_rng(2).normal(size=rows.size)
    df = tables.particles.assign(rlnClassNumber=np.where(truth.state >= 0, truth.state + 1, 4),
                                 cdagLatent1=-2 * truth.t + 1, cdagLatent2=noise)
    ps = _set(root, tables, df, "classes.star")
    text, ari = ds._classes(read_tables(ps, root), rows, truth)
    assert ari == pytest.approx(1.0) and "junk 100%" in text
    assert (ds._separation(ari), ds._separation(0.5)) == ("ARI >= 0.8", "ARI < 0.8")  # no verdict of its own
    text, corr = ds._latents(read_tables(ps, root), rows, truth)
    assert corr == pytest.approx(1.0) and text.startswith("|corr(latent k, t)| = 1.000, 0.")
    assert text.endswith("(best: latent 1)")


def test_map_fit_to_truth_finds_rotation_and_hand(dataset: tuple[Path, ParticleTables, ds.Truth]) -> None:
    """A rotated mirror image of the truth fits it to near the working box's Nyquist; noise does not."""
    _, _, truth = dataset
    rows = np.flatnonzero(truth.state == 0)
    m = truth.maps[0]
    D, a = 16, m.shape[-1] * 6.0 / 16
    res, corr = ds._fit_to_truth(np.rot90(m, 1, axes=(0, 1))[::-1].copy(), D, a, rows, truth)
    print(f"rotated mirror: FSC 0.5 at {res:.1f} Å, corr {corr:.3f}")
    assert corr >= 0.95 and res <= 2.5 * a  # trilinear resampling damps the last shells
    noise = np.random.default_rng(3).normal(size=m.shape).astype(np.float32)
    res, corr = ds._fit_to_truth(noise, D, a, rows, truth)
    print(f"noise: FSC 0.5 at {res:.1f} Å, corr {corr:.3f}")
    assert corr < 0.5 and res > 4 * a
