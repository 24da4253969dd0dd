"""import_particles, micrograph mode: extraction from simulated micrographs against the truth,
Fourier crop, coordinate sources, edge handling, bad input naming file and row."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pydantic
import pytest
import starfile

from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.import_particles import JOB
from jobs.particles import iter_batches
from jobs.simulated_dataset import (
    AMPLITUDE_CONTRAST,
    CS_MM,
    VOLTAGE_KV,
    Preset,
    load_model,
    write_dataset,
)
from kernels.ctf import ctf_2d
from kernels.fourier import fourier_crop
from kernels.phantom import apply_ctf, particle_atoms, project_atoms

PRESET = Preset(
    n_particles=60, box=32, pixel_size=4.0, n_micrographs=2, n_atoms=80,
    junk_blob_fraction=0.05, duplicate_fraction=0.2,
)
RAW = {"normalize": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small simulated dataset with noise-free copies of its micrographs."""
    root = tmp_path_factory.mktemp("sim") / "data"
    write_dataset(PRESET, root, seed=5, noiseless_micrographs=True)
    mics = starfile.read(root / "micrographs_ctf.star", always_dict=True)
    mics["micrographs"]["rlnMicrographName"] = [
        f"truth/micrographs_clean/{Path(n).name}" for n in mics["micrographs"]["rlnMicrographName"]
    ]
    starfile.write(mics, root / "clean_ctf.star")
    return root


@pytest.fixture
def project(tmp_path, dataset) -> Path:
    """A writable copy of the dataset inside the test's project directory."""
    shutil.copytree(dataset, tmp_path / "data")
    return tmp_path / "data"


def _params(data: Path, star: str = "micrographs_ctf.star", **extra) -> dict:
    return {"source": "micrographs", "micrographs_star": str(data / star),
            "coords": str(data / "Micrographs" / "*_pick.star"), "extract_box": PRESET.box,
            **extra}


def _context(tmp_path: Path, name: str, events: list | None = None) -> JobContext:
    return JobContext(name=name, project_dir=tmp_path, work_dir=tmp_path / "jobs/.tmp" / name,
                      final_dir=tmp_path / "jobs" / name,
                      emit=None if events is None else events.append)


def _run(tmp_path: Path, params: dict, name: str = "extract", events: list | None = None):
    ctx = _context(tmp_path, name, events)
    ps = JOB.run(JOB.params(**params), {}, ctx)["particles"]
    shutil.move(ctx.work_dir, ctx.final_dir)
    images = np.concatenate([b[1] for b in iter_batches(ps, tmp_path, 16)])
    return ps, images, starfile.read(tmp_path / ps.star, always_dict=True)


def _truth_rows(parts: pd.DataFrame, truth) -> np.ndarray:
    """Truth row of each output particle, found by (micrograph, coordinate)."""
    key = {(int(m), int(x), int(y)): i
           for i, (m, (x, y)) in enumerate(zip(truth["micrograph"], truth["coordinates"],
                                               strict=True))}
    mic = parts["rlnMicrographName"].str.extract(r"mic_(\d+)\.mrc")[0].astype(int) - 1
    return np.array([key[(m, round(x), round(y))] for m, x, y in
                     zip(mic, parts["rlnCoordinateX"], parts["rlnCoordinateY"], strict=True)])


def _clean_projections(data: Path, parts: pd.DataFrame, rows: np.ndarray, truth) -> np.ndarray:
    """Noise-free CTF-modulated projections from the truth poses/shifts and the IMPORTED CTF."""
    ph, states, motion = load_model(data / "truth")
    atoms = particle_atoms(ph, states, truth["state"][rows], truth["t"][rows], motion)
    img = project_atoms(atoms, truth["matrices"][rows], truth["shifts_px"][rows], PRESET.box)
    ctf = ctf_2d(PRESET.box, PRESET.pixel_size, parts["rlnDefocusU"].to_numpy(),
                 parts["rlnDefocusV"].to_numpy(), parts["rlnDefocusAngle"].to_numpy(),
                 voltage_kv=VOLTAGE_KV, cs_mm=CS_MM, amplitude_contrast=AMPLITUDE_CONTRAST)
    return apply_ctf(img, ctf)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1) - a.mean(axis=(1, 2))[:, None]
    b = b.reshape(len(b), -1) - b.mean(axis=(1, 2))[:, None]
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_params_validation():
    with pytest.raises(pydantic.ValidationError, match="needs micrographs_star"):
        JOB.params(source="micrographs", coords="*.star", extract_box=32)
    with pytest.raises(pydantic.ValidationError, match="needs extract_box"):
        JOB.params(source="micrographs", micrographs_star="m.star", coords="*.star")
    with pytest.raises(pydantic.ValidationError, match="extract_box must be even"):
        JOB.params(source="micrographs", micrographs_star="m.star", coords="c", extract_box=33)
    with pytest.raises(pydantic.ValidationError, match="coords is not used"):
        JOB.params(source="star", star_path="p.star", coords="c")


def test_matches_clean_particles(tmp_path, dataset):
    """Boxes cut from the noise-free micrographs = truth projections (pose, shift, CTF)."""
    ps, images, blocks = _run(tmp_path, _params(dataset, "clean_ctf.star", **RAW))
    truth = np.load(dataset / "truth/particles.npz")
    parts = blocks["particles"]
    assert ps.count == len(truth["kind"]) and ps.box == PRESET.box
    assert ps.provides == {"ctf", "coordinates"}
    assert ps.pixel_size == pytest.approx(PRESET.pixel_size)
    rows = _truth_rows(parts, truth)
    assert sorted(rows.tolist()) == list(range(len(rows)))  # every pick, once
    np.testing.assert_array_equal(parts[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(),
                                  truth["coordinates"][rows])
    np.testing.assert_allclose(parts[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]],
                               truth["defocus"][rows], atol=1e-4)
    good = np.flatnonzero((truth["kind"][rows] == 0) & (truth["duplicate_of"][rows] < 0))
    assert len(good) >= 40
    clean = _clean_projections(dataset, parts.iloc[good], rows[good], truth)
    corr = _corr(images[good], clean)
    print(f"extraction vs truth projection: min corr {corr.min():.5f}, mean {corr.mean():.5f}")
    assert corr.min() >= 0.99
    # a box one pixel off correlates clearly worse: the test sees positions
    assert _corr(np.roll(images[good], 1, axis=2), clean).mean() < 0.95

    optics = blocks["optics"]
    assert optics["rlnImageSize"].iloc[0] == PRESET.box
    assert optics["rlnMicrographPixelSize"].iloc[0] == pytest.approx(PRESET.pixel_size)


def test_fourier_crop_matches_truth(tmp_path, dataset):
    ps, images, blocks = _run(tmp_path, _params(dataset, "clean_ctf.star", box_crop=16, **RAW))
    assert (ps.box, ps.pixel_size) == (16, pytest.approx(2 * PRESET.pixel_size))
    truth = np.load(dataset / "truth/particles.npz")
    parts = blocks["particles"]
    rows = _truth_rows(parts, truth)
    good = np.flatnonzero((truth["kind"][rows] == 0) & (truth["duplicate_of"][rows] < 0))
    clean = fourier_crop(_clean_projections(dataset, parts.iloc[good], rows[good], truth), 16)
    corr = _corr(images[good], clean)
    print(f"box_crop 16: min corr {corr.min():.5f}")
    assert corr.min() >= 0.99


def test_noisy_micrographs_equal_simulator_stacks(tmp_path, dataset):
    """Extraction from the noisy micrographs reproduces the simulator's own cut stacks;
    normalised output has background mean 0, std 1."""
    _, images, blocks = _run(tmp_path, _params(dataset, **RAW))
    truth_stacks = np.concatenate([mrcfile.read(f) for f in
                                   sorted((dataset / "Particles").glob("*.mrcs"))])
    np.testing.assert_array_equal(images, truth_stacks)
    _, norm, _ = _run(tmp_path, _params(dataset, invert_contrast=True), name="norm")
    c = np.arange(PRESET.box) - PRESET.box // 2
    outside = np.hypot(*np.meshgrid(c, c, indexing="ij")) > 0.75 * PRESET.box / 2
    bg = norm[:, outside]
    assert np.abs(bg.mean(1)).max() < 1e-4 and np.abs(bg.std(1) - 1).max() < 1e-4
    scale = truth_stacks[:, outside].std(1)
    np.testing.assert_allclose(
        norm, -(truth_stacks - truth_stacks[:, outside].mean(1)[:, None, None])
        / scale[:, None, None], atol=1e-4)


def test_particles_star_coordinates(tmp_path, dataset):
    """coords may be a particles STAR: its other columns (poses) pass through."""
    ps, images, blocks = _run(tmp_path, _params(dataset, coords=str(dataset / "particles.star"),
                                                **RAW))
    assert ps.provides == {"ctf", "coordinates", "alignments2D", "alignments3D"}
    source = starfile.read(dataset / "particles.star")["particles"]
    parts = blocks["particles"]
    assert (parts["rlnImageOriginalName"] == source["rlnImageName"]).all()
    np.testing.assert_allclose(parts["rlnAngleTilt"], source["rlnAngleTilt"], atol=1e-5)
    truth_stacks = np.concatenate([mrcfile.read(f) for f in
                                   sorted((dataset / "Particles").glob("*.mrcs"))])
    np.testing.assert_array_equal(images, truth_stacks)


def _write_picks(path: Path, xy: list[tuple[float, float]]) -> None:
    starfile.write(pd.DataFrame(xy, columns=["rlnCoordinateX", "rlnCoordinateY"]), path)


def test_edge_particles_skipped_and_counted(tmp_path, project):
    ny, nx = mrcfile.read(project / "Micrographs/mic_0001.mrc").shape
    h = PRESET.box // 2
    picks = [(h, h), (h - 1, 100), (nx - h, 100), (nx - h + 1, 100), (100, ny - h),
             (100, ny - h + 1), (0, 0), (150.4, 120.6)]
    (project / "picks").mkdir()
    _write_picks(project / "picks/mic_0001_manual.star", picks)
    events: list = []
    params = _params(project, coords="data/picks/*_manual.star", **RAW)
    ps, images, blocks = _run(tmp_path, params, events=events)
    assert ps.count == 4
    parts = blocks["particles"]
    np.testing.assert_array_equal(parts["rlnCoordinateX"], [h, nx - h, 100, 150.4])
    metrics = {e["name"]: e["value"] for e in events if e["event"] == "metric"}
    assert metrics["skipped_at_edge"] == 4 and metrics["particles"] == 4
    assert any(e["event"] == "log" and "skipped 4 particles" in e["message"] for e in events)
    mic = mrcfile.read(project / "Micrographs/mic_0001.mrc")
    np.testing.assert_array_equal(images[0], mic[:2 * h, :2 * h])
    np.testing.assert_array_equal(images[3], mic[121 - h:121 + h, 150 - h:150 + h])


# -- bad input: JobInputError naming the file and the row ----------------------------------


def _break(case: str, data: Path) -> tuple[dict, str]:
    params = _params(data, **RAW)
    star = data / "micrographs_ctf.star"
    blocks = starfile.read(star, always_dict=True)
    if case == "missing_micrograph":
        (data / "Micrographs/mic_0002.mrc").unlink()
        pattern = r"micrographs_ctf\.star, row 2: .*mic_0002\.mrc: MRC stack not found"
    elif case == "outside":
        _write_picks(data / "Micrographs/mic_0002_pick.star", [(60, 60), (61, 62), (-3, 80)])
        pattern = r"mic_0002_pick\.star, row 3: coordinate \(-3, 80\) is outside micrograph"
    elif case == "no_ctf_row":
        blocks["micrographs"] = blocks["micrographs"].iloc[[0]]
        pattern = r"mic_0002_pick\.star: names no micrograph of .*micrographs_ctf\.star \(no CTF"
    elif case == "no_ctf_row_particles_star":
        blocks["micrographs"] = blocks["micrographs"].iloc[[0]]
        params["coords"] = str(data / "particles.star")
        first = int((starfile.read(data / "particles.star")["particles"]["rlnMicrographName"]
                     == "Micrographs/mic_0002.mrc").to_numpy().argmax())
        pattern = (rf"particles\.star, row {first + 1}: micrograph Micrographs/mic_0002\.mrc is "
                   r"not in .*micrographs_ctf\.star \(no CTF")
    elif case == "ctf_value":
        blocks["micrographs"].loc[1, "rlnDefocusV"] = np.nan
        pattern = r"micrographs_ctf\.star, row 2: rlnDefocusV is missing"
    elif case == "ctf_value_in_coords":
        source = starfile.read(data / "particles.star", always_dict=True)
        source["particles"].loc[4, "rlnDefocusU"] = np.nan
        starfile.write(source, data / "particles.star")
        params["coords"] = str(data / "particles.star")
        pattern = r"particles\.star, row 5: rlnDefocusU is missing"
    elif case == "ctf_column":
        blocks["micrographs"] = blocks["micrographs"].drop(columns="rlnDefocusAngle")
        pattern = r"micrographs_ctf\.star: missing CTF column rlnDefocusAngle"
    elif case == "pixel_mismatch":
        with mrcfile.open(data / "Micrographs/mic_0002.mrc", "r+") as mrc:
            mrc.voxel_size = 4.4
        pattern = r"micrographs_ctf\.star, row 2: pixel size 4 Å in the STAR but 4\.4 Å"
    elif case == "nan_pixels":
        with mrcfile.open(data / "Micrographs/mic_0002.mrc", "r+") as mrc:
            x, y = (int(v) for v in starfile.read(
                data / "Micrographs/mic_0002_pick.star").iloc[1])
            mrc.data[y, x] = np.nan
        pattern = r"mic_0002\.mrc \(.*mic_0002_pick\.star, row 2\): NaN or Inf"
    elif case == "no_coordinate_files":
        params["coords"] = str(data / "nowhere/*.star")
        pattern = r"coords: no coordinate files match .*nowhere/\*\.star"
    starfile.write(blocks, star)
    return params, pattern


BAD = ["missing_micrograph", "outside", "no_ctf_row", "no_ctf_row_particles_star", "ctf_value",
       "ctf_value_in_coords", "ctf_column", "pixel_mismatch", "nan_pixels", "no_coordinate_files"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tmp_path, project):
    params, pattern = _break(case, project)
    ctx = _context(tmp_path, "bad")
    with pytest.raises(JobInputError, match=pattern):
        JOB.run(JOB.params(**params), {}, ctx)
    if case != "nan_pixels":  # validated before anything is written
        assert not any(p.suffix in (".mrcs", ".star") for p in ctx.work_dir.rglob("*"))
