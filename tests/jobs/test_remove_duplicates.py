"""remove_duplicates on simulated picks with known duplicates (extracted in micrograph mode)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.distance import pdist

from jobs import registry
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.import_particles import JOB as IMPORT
from jobs.remove_duplicates import JOB
from jobs.simulated_dataset import Preset, write_dataset

PRESET = Preset(n_particles=120, box=32, pixel_size=4.0, n_micrographs=3, n_atoms=60,
                junk_noise_fraction=0.05, duplicate_fraction=0.25)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sim") / "data"
    write_dataset(PRESET, root, seed=11)
    return root, dict(np.load(root / "truth/particles.npz"))


def _context(project: Path, name: str, events: list) -> JobContext:
    return JobContext(name=name, project_dir=project, work_dir=project / "jobs/.tmp" / name,
                      final_dir=project / "jobs" / name, emit=events.append)


def _run(job, params: dict, inputs: dict, project: Path, name: str, events: list | None = None):
    ctx = _context(project, name, [] if events is None else events)
    out = job.run(job.params(**params), inputs, ctx)
    shutil.move(ctx.work_dir, ctx.final_dir)
    return out


def _import(project: Path, data: Path, coords: str, name: str = "import"):
    params = {"source": "micrographs", "micrographs_star": str(data / "micrographs_ctf.star"),
              "coords": coords, "extract_box": PRESET.box, "normalize": False}
    return _run(IMPORT, params, {}, project, name)["particles"]


def _truth_rows(project: Path, ps, truth: dict) -> np.ndarray:
    parts = starfile.read(project / ps.star)["particles"]
    key = {(int(m), int(x), int(y)): i for i, (m, (x, y)) in
           enumerate(zip(truth["micrograph"], truth["coordinates"], strict=True))}
    mic = parts["rlnMicrographName"].str.extract(r"mic_(\d+)\.mrc")[0].astype(int) - 1
    return np.array([key[(m, int(x), int(y))] for m, x, y in
                     zip(mic, parts["rlnCoordinateX"], parts["rlnCoordinateY"], strict=True)])


def _min_true_spacing_angst(truth: dict) -> float:
    distinct = truth["duplicate_of"] < 0
    return min(pdist(truth["coordinates"][distinct & (truth["micrograph"] == m)]).min()
               for m in range(PRESET.n_micrographs)) * PRESET.pixel_size


def test_registered():
    assert registry.get("remove_duplicates") is JOB
    assert JOB.inputs["particles"].requires == {"coordinates"}


def test_finds_simulated_duplicates(tmp_path, dataset):
    data, truth = dataset
    picks = _import(tmp_path, data, str(data / "Micrographs/*_pick.star"))
    assert "coordinates" in picks.provides
    spacing = _min_true_spacing_angst(truth)
    sep = 40.0  # > the largest duplicate offset (3 sqrt 2 px = 17 Å), < the true spacing
    assert sep < spacing
    events: list = []
    out = _run(JOB, {"min_separation_A": sep}, {"particles": picks}, tmp_path, "dedup", events)
    kept, removed = out["particles"], out["removed"]
    is_dup = truth["duplicate_of"] >= 0
    removed_rows = _truth_rows(tmp_path, removed, truth)
    kept_rows = _truth_rows(tmp_path, kept, truth)
    recall = is_dup[removed_rows].sum() / is_dup.sum()
    print(f"duplicates: {is_dup.sum()}, removed {len(removed_rows)}, recall {recall:.3f}, "
          f"true spacing {spacing:.0f} Å")
    assert recall >= 0.95
    assert not (~is_dup[removed_rows]).any()  # no true particle removed
    assert sorted([*kept_rows, *removed_rows]) == list(range(len(is_dup)))
    assert kept.count + removed.count == picks.count and removed.count == is_dup.sum()
    assert kept.stacks == picks.stacks == removed.stacks
    assert kept.provides == picks.provides
    metrics = {e["name"]: e["value"] for e in events if e["event"] == "metric"}
    assert metrics["removed"] == removed.count
    # the kept set's image names still point at the right boxes
    names = starfile.read(tmp_path / kept.star)["particles"]["rlnImageName"]
    source = starfile.read(tmp_path / picks.star)["particles"].set_index("rlnImageName")
    np.testing.assert_array_equal(source.loc[names, "rlnCoordinateX"], truth["coordinates"][
        kept_rows, 0])


def test_aligned_centres_and_scores(tmp_path, dataset):
    """With alignments (truth origins) a duplicate sits on its original's centre; the score
    column decides which of the two is kept."""
    data, truth = dataset
    picks = _import(tmp_path, data, str(data / "particles.star"))
    is_dup = truth["duplicate_of"] >= 0
    # 2 Å: below the smallest pick offset (4 Å), so only the aligned centres coincide
    out = _run(JOB, {"min_separation_A": 2.0}, {"particles": picks}, tmp_path, "aligned")
    assert is_dup[_truth_rows(tmp_path, out["removed"], truth)].all()
    assert out["removed"].count == is_dup.sum()
    out = _run(JOB, {"min_separation_A": 2.0, "use_alignments": False},
               {"particles": picks}, tmp_path, "unaligned")
    assert out["removed"].count == 0

    # a figure of merit that prefers the duplicates: the originals go instead
    star = tmp_path / picks.star
    blocks = starfile.read(star, always_dict=True)
    rows = _truth_rows(tmp_path, picks, truth)
    blocks["particles"]["rlnAutopickFigureOfMerit"] = is_dup[rows].astype(float)
    starfile.write(blocks, star)
    out = _run(JOB, {"min_separation_A": 40.0}, {"particles": picks}, tmp_path, "scored")
    removed = _truth_rows(tmp_path, out["removed"], truth)
    np.testing.assert_array_equal(np.sort(removed), np.sort(truth["duplicate_of"][is_dup]))
    with pytest.raises(JobInputError, match="no score column cdagNope"):
        _run(JOB, {"score_column": "cdagNope"}, {"particles": picks}, tmp_path, "bad")


def test_missing_coordinates(tmp_path, dataset, pio):
    data = pio.make_particles(tmp_path / "relion")
    star = pio.write_star31(data.root / "p.star", data)
    ps = _run(IMPORT, {"star_path": str(star)}, {}, tmp_path, "plain")["particles"]
    with pytest.raises(JobInputError, match=r"particles\.star: missing column rlnMicrographName"):
        _run(JOB, {}, {"particles": ps}, tmp_path, "dedup")

    blocks = starfile.read(tmp_path / ps.star, always_dict=True)
    parts = blocks["particles"]
    parts["rlnMicrographName"] = "mic.mrc"
    parts["rlnCoordinateX"], parts["rlnCoordinateY"] = np.arange(50.0) * 100, 10.0
    parts.loc[6, "rlnCoordinateY"] = np.nan
    starfile.write({"optics": blocks["optics"], "particles": pd.DataFrame(parts)},
                   tmp_path / ps.star)
    with pytest.raises(JobInputError, match=r"particles\.star, row 7: rlnCoordinateY is missing"):
        _run(JOB, {}, {"particles": ps}, tmp_path, "dedup2")
