"""import_particles (particle mode): STAR 3.0/3.1/5 and .cs inputs, bad input, I2, crop, RELION."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pydantic
import pytest
import starfile
from cryosparc.dataset import Dataset

from jobs import registry
from jobs.errors import JobInputError
from jobs.import_particles import JOB, background_mask
from jobs.particles import iter_batches
from kernels.rotations import cryosparc_from_relion, euler_to_matrix

RAW = {"normalize": False}


def _images(ps, project: Path) -> np.ndarray:
    return np.concatenate([b[1] for b in iter_batches(ps, project, 17)])


def _star(ps, project: Path) -> dict[str, pd.DataFrame]:
    return starfile.read(project / ps.star, always_dict=True)


def test_registered():
    assert registry.get("import_particles") is JOB


def test_params_validation():
    with pytest.raises(pydantic.ValidationError, match="needs star_path"):
        JOB.params(source="star")
    with pytest.raises(pydantic.ValidationError, match="cs_path is not used"):
        JOB.params(source="star", star_path="a.star", cs_path="b.cs")
    with pytest.raises(pydantic.ValidationError, match="even"):
        JOB.params(source="star", star_path="a.star", box_crop=23)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        JOB.params(source="star", star_path="a.star", pixel_size=1.0)


def test_star31_round_trip(particles_data, tmp_path, run_job, pio):
    star = pio.write_star31(particles_data.root / "particles.star", particles_data)
    ps = run_job(JOB, {"star_path": str(star), **RAW}, name="import")["particles"]
    assert (ps.count, ps.box, ps.pixel_size) == (50, 32, pytest.approx(1.5))
    assert ps.provides == {"ctf", "alignments2D", "alignments3D", "class"}
    assert ps.star == "jobs/import/particles.star" and ps.stacks == ["jobs/import/particles.mrcs"]
    np.testing.assert_array_equal(_images(ps, tmp_path), particles_data.images)
    assert (tmp_path / "jobs/import/plots/particles.png").is_file()

    blocks = _star(ps, tmp_path)
    assert set(blocks) == {"optics", "particles"}
    optics, parts = blocks["optics"], blocks["particles"]
    assert optics["rlnImageSize"].iloc[0] == 32 and optics["rlnImagePixelSize"].iloc[0] == 1.5
    assert optics["rlnVoltage"].iloc[0] == 300.0
    assert parts["rlnImageName"].iloc[49] == "000050@jobs/import/particles.mrcs"
    for col, values in particles_data.columns.items():
        np.testing.assert_allclose(parts[col].to_numpy(), values, atol=1e-5, err_msg=col)
    with mrcfile.open(tmp_path / ps.stacks[0], header_only=True) as mrc:
        assert mrc.voxel_size.x == pytest.approx(1.5)
        assert int(mrc.header.mode) == 2


def test_star30_import(particles_data, tmp_path, run_job, pio):
    star = pio.write_star30(particles_data.root / "p30.star", particles_data, optics=False)
    params = {"star_path": str(star), "voltage_kv": 200, "cs_mm": 2.0, "amplitude_contrast": 0.07}
    ps = run_job(JOB, {**params, **RAW})["particles"]
    blocks = _star(ps, tmp_path)
    optics, parts = blocks["optics"], blocks["particles"]
    assert (optics["rlnVoltage"].iloc[0], optics["rlnSphericalAberration"].iloc[0]) == (200, 2)
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.5)
    assert "rlnOriginX" not in parts
    np.testing.assert_allclose(
        parts["rlnOriginXAngst"], particles_data.columns["rlnOriginXAngst"], atol=1e-5
    )
    np.testing.assert_array_equal(_images(ps, tmp_path), particles_data.images)


def test_star5_extra_columns_pass_through(particles_data, tmp_path, run_job, pio):
    extra = {
        "rlnCtfMaxResolution": np.linspace(3, 5, 50),
        "rlnGroupNumber": np.arange(50) % 3 + 1,
        "rlnHelicalTubeID": np.ones(50, dtype=int),
        "cdagScale": np.full(50, 1.25),
    }
    star = pio.write_star31(particles_data.root / "p5.star", particles_data, extra)
    ps = run_job(JOB, {"star_path": str(star), **RAW})["particles"]
    parts = _star(ps, tmp_path)["particles"]
    for col, values in extra.items():
        np.testing.assert_allclose(parts[col], values, atol=1e-6, err_msg=col)


def test_root_and_relative_paths(particles_data, tmp_path, run_job, pio):
    """rlnImageName relative to `root`; star_path relative to the project directory."""
    meta = tmp_path / "meta"
    meta.mkdir()
    pio.write_star31(meta / "p.star", particles_data)
    with pytest.raises(JobInputError, match="MRC stack not found"):
        run_job(JOB, {"star_path": "meta/p.star"})
    ps = run_job(JOB, {"star_path": "meta/p.star", "root": "relion", **RAW})["particles"]
    np.testing.assert_array_equal(_images(ps, tmp_path), particles_data.images)


def _write_cs(path: Path, data, pose: np.ndarray, shift_px: np.ndarray) -> None:
    n = data.count
    blob = [name.split("@") for name in data.names]
    ds = Dataset.allocate(
        n,
        [
            ("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
            ("blob/psize_A", "f4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
            ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"),
            ("ctf/df_angle_rad", "f4"), ("alignments3D/pose", "f4", (3,)),
            ("alignments3D/shift", "f4", (2,)), ("alignments3D/split", "u4"),
        ],
    )
    ds["blob/path"] = [">" + p for _, p in blob]
    ds["blob/idx"] = [int(i) - 1 for i, _ in blob]
    ds["blob/shape"] = np.tile([32, 32], (n, 1))
    ds["blob/psize_A"] = data.pixel_size
    ds["ctf/accel_kv"] = 300.0
    ds["ctf/cs_mm"] = 2.7
    ds["ctf/amp_contrast"] = 0.1
    ds["ctf/df1_A"] = data.columns["rlnDefocusU"]
    ds["ctf/df2_A"] = data.columns["rlnDefocusV"]
    ds["ctf/df_angle_rad"] = np.deg2rad(data.columns["rlnDefocusAngle"])
    ds["alignments3D/pose"] = pose
    ds["alignments3D/shift"] = shift_px
    ds["alignments3D/split"] = data.columns["rlnRandomSubset"] - 1
    ds.save(str(path))


def test_cs_import(particles_data, tmp_path, run_job):
    c = particles_data.columns
    pose = cryosparc_from_relion(c["rlnAngleRot"], c["rlnAngleTilt"], c["rlnAnglePsi"])
    shift_px = np.stack([c["rlnOriginXAngst"], c["rlnOriginYAngst"]], 1) / particles_data.pixel_size
    cs = particles_data.root / "P1_J5_particles.cs"
    _write_cs(cs, particles_data, pose, shift_px)
    ps = run_job(JOB, {"source": "cs", "cs_path": str(cs), **RAW})["particles"]
    assert ps.provides == {"ctf", "alignments2D", "alignments3D"}
    np.testing.assert_array_equal(_images(ps, tmp_path), particles_data.images)
    parts = _star(ps, tmp_path)["particles"]
    for col in ("rlnDefocusU", "rlnDefocusV", "rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(parts[col], c[col], atol=2e-3, err_msg=col)
    np.testing.assert_allclose(parts["rlnDefocusAngle"], c["rlnDefocusAngle"], atol=1e-4)
    np.testing.assert_array_equal(parts["rlnRandomSubset"], c["rlnRandomSubset"])
    got = euler_to_matrix(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"])
    want = euler_to_matrix(c["rlnAngleRot"], c["rlnAngleTilt"], c["rlnAnglePsi"])
    assert np.abs(got - want).max() < 1e-5


# -- bad input: one JobInputError naming the file and the row -------------------------------


def _break(case: str, data, pio) -> tuple[Path, str]:
    """Write a STAR with one defect; return it and a regex the error must match."""
    star = data.root / "bad.star"
    if case == "missing_stack":
        data.stacks[1].unlink()
        pattern = r"bad\.star, row 31: .*stack1\.mrcs: MRC stack not found"
    elif case == "index_past_end":
        data.names[12] = "000031@Extract/job007/stack0.mrcs"
        pattern = r"bad\.star, row 13: image 31 is past the end of .*stack0\.mrcs \(30 images\)"
    elif case in ("nan", "inf"):
        with mrcfile.open(data.stacks[1], "r+") as mrc:
            mrc.data[4, 3, 3] = np.nan if case == "nan" else np.inf
        pattern = r"stack1\.mrcs, image 5 \(.*bad\.star, row 35\): NaN or Inf"
    elif case == "missing_ctf":
        del data.columns["rlnDefocusV"]
        pattern = r"bad\.star: missing CTF column rlnDefocusV"
    elif case == "ctf_value":
        data.columns["rlnDefocusU"][8] = np.nan
        pattern = r"bad\.star, row 9: rlnDefocusU is missing"
    elif case == "mixed_box":
        names, _ = pio.write_stacks(data.root, np.zeros((3, 40, 40), np.float32), (3,), 1.5, "X")
        data.names[44] = names[1]
        pattern = r"mixed box sizes: .*X/stack0\.mrcs has 40 px"
    elif case == "pixel_mismatch":
        with mrcfile.open(data.stacks[1], "r+") as mrc:
            mrc.voxel_size = 1.6
        pattern = r"bad\.star, row 31: pixel size 1\.5 Å in the metadata but 1\.6 Å .*stack1\.mrcs"
    pio.write_star31(star, data)
    return star, pattern


BAD_CASES = ["missing_stack", "index_past_end", "nan", "inf", "missing_ctf", "ctf_value",
             "mixed_box", "pixel_mismatch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input(case, particles_data, tmp_path, pio):
    star, pattern = _break(case, particles_data, pio)
    ctx = pio.job_context(tmp_path, "bad")
    params = JOB.params(star_path=str(star), batch_size=8)
    with pytest.raises(JobInputError, match=pattern):
        JOB.run(params, {}, ctx)
    if case not in ("nan", "inf"):  # validated before anything is written
        assert not any(p.suffix in (".mrcs", ".star") for p in ctx.work_dir.rglob("*"))
    assert not ctx.final_dir.exists()


def test_missing_star_and_cs(tmp_path, pio):
    ctx = pio.job_context(tmp_path, "none")
    with pytest.raises(JobInputError, match=r"nope\.star: STAR file not found"):
        JOB.run(JOB.params(star_path="nope.star"), {}, ctx)
    with pytest.raises(JobInputError, match=r"nope\.cs: \.cs file not found"):
        JOB.run(JOB.params(source="cs", cs_path="nope.cs"), {}, ctx)


# -- processing: normalisation (I2), inversion, Fourier crop ----------------------------------


def _background_stats(images: np.ndarray, box: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(box) - box // 2
    outside = np.hypot(*np.meshgrid(c, c, indexing="ij")) > radius
    bg = images[:, outside]
    return bg.mean(axis=1), bg.std(axis=1)


def test_normalisation_i2(tmp_path, run_job, pio):
    rng = np.random.default_rng(7)
    noise = rng.normal(5.0, 4.0, (50, 64, 64)).astype(np.float32)
    data = pio.make_particles(tmp_path / "relion", images=noise, box=64)
    star = pio.write_star31(data.root / "p.star", data)
    ps = run_job(JOB, {"star_path": str(star)})["particles"]
    out = _images(ps, tmp_path)
    mean, std = _background_stats(out, 64, 0.75 * 64 / 2)
    assert np.abs(mean).max() < 0.01 and np.abs(std - 1).max() < 0.01
    whole = out.reshape(50, -1)
    assert abs(whole.mean()) < 0.01 and abs(whole.std() - 1) < 0.01  # pure noise: same inside

    ps = run_job(JOB, {"star_path": str(star), "norm_diameter_A": 60.0})["particles"]
    mean, std = _background_stats(_images(ps, tmp_path), 64, 60.0 / 1.5 / 2)
    assert np.abs(mean).max() < 0.01 and np.abs(std - 1).max() < 0.01


def test_norm_diameter_too_large():
    with pytest.raises(JobInputError, match="norm_diameter_A"):
        background_mask(32, 1.5, 100.0)


def test_contrast_inversion(particles_data, tmp_path, run_job, pio):
    star = pio.write_star31(particles_data.root / "p.star", particles_data)
    ps = run_job(JOB, {"star_path": str(star), "invert_contrast": True, **RAW})["particles"]
    np.testing.assert_array_equal(_images(ps, tmp_path), -particles_data.images)


def test_fourier_crop(tmp_path, run_job, pio):
    """A band-limited image keeps its values on the coarser grid; pixel size scales by D/D'."""
    D, Dc = 32, 16
    y, x = np.meshgrid(np.arange(D) - D // 2, np.arange(D) - D // 2, indexing="ij")
    yc, xc = np.meshgrid(np.arange(Dc) - Dc // 2, np.arange(Dc) - Dc // 2, indexing="ij")
    rng = np.random.default_rng(2)
    f = rng.integers(-3, 4, (50, 2))
    a = rng.uniform(0.5, 2.0, (50, 1, 1))

    def wave(xx, yy, d):
        return a * np.cos(2 * np.pi * (f[:, 0, None, None] * xx + f[:, 1, None, None] * yy) / d)

    data = pio.make_particles(tmp_path / "relion", images=wave(x, y, D).astype(np.float32))
    star = pio.write_star31(data.root / "p.star", data)
    ps = run_job(JOB, {"star_path": str(star), "box_crop": Dc, **RAW})["particles"]
    assert (ps.box, ps.pixel_size) == (Dc, pytest.approx(3.0))
    assert _star(ps, tmp_path)["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(3.0)
    with mrcfile.open(tmp_path / ps.stacks[0], header_only=True) as mrc:
        assert mrc.voxel_size.x == pytest.approx(3.0)
    err = np.abs(_images(ps, tmp_path) - wave(xc, yc, Dc)).max()
    assert err < 1e-4, err
    with pytest.raises(JobInputError, match="larger than the particle box"):
        run_job(JOB, {"star_path": str(star), "box_crop": 64})


def test_demo_source(tmp_path, run_job):
    """The demo dataset is simulated inside the job directory and extracted from its
    micrographs with its pick files (no poses carried over from the truth)."""
    ps = run_job(JOB, {"source": "demo", "seed": 1}, name="demo")["particles"]
    source = starfile.read(tmp_path / "jobs/demo/demo_source/particles.star")["particles"]
    assert ps.count == len(source) > 0 and ps.provides == {"ctf", "coordinates"}
    parts = _star(ps, tmp_path)["particles"]
    np.testing.assert_allclose(parts["rlnDefocusU"], source["rlnDefocusU"], atol=1e-5)
    assert (parts["rlnMicrographName"] == source["rlnMicrographName"]).all()
    for col in ("rlnCoordinateX", "rlnCoordinateY"):
        np.testing.assert_array_equal(parts[col], source[col])
    first = next(iter_batches(ps, tmp_path, 500))[1]
    assert first.shape == (500, ps.box, ps.box) and np.isfinite(first).all()
    mean, std = _background_stats(first, ps.box, 0.75 * ps.box / 2)
    assert np.abs(mean).max() < 0.01 and np.abs(std - 1).max() < 0.01


# -- RELION reads what cryodag writes ------------------------------------------------------


def _relion(tool: str, *args: str, cwd: Path) -> str:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not on PATH")
    res = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


@pytest.fixture
def imported(particles_data, tmp_path, run_job, pio):
    extra = {"cdagScale": np.full(50, 1.25), "rlnCtfMaxResolution": np.full(50, 4.0)}
    star = pio.write_star31(particles_data.root / "p.star", particles_data, extra)
    return run_job(JOB, {"star_path": str(star), "box_crop": 24}, name="import")["particles"]


@pytest.mark.relion
def test_relion_star_handler_reads_output(imported, tmp_path):
    _relion("relion_star_handler", "--i", imported.star, "--o", "x.star", cwd=tmp_path)
    back = starfile.read(tmp_path / "x.star", always_dict=True)
    ours = _star(imported, tmp_path)["particles"]
    assert len(back["particles"]) == 50
    assert back["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(2.0)
    assert (back["particles"]["rlnImageName"] == ours["rlnImageName"]).all()
    for col in ("rlnDefocusU", "rlnAngleTilt", "rlnOriginXAngst", "rlnRandomSubset"):
        np.testing.assert_allclose(back["particles"][col], ours[col], atol=1e-4, err_msg=col)


@pytest.mark.relion
def test_relion_image_handler_reads_stack(imported, tmp_path):
    """RELION reads the stack and, through the STAR (run from the project dir), every image."""
    images = _images(imported, tmp_path)
    for source in (imported.stacks[0], imported.star):
        out = _relion("relion_image_handler", "--i", source, "--stats", cwd=tmp_path)
        lines = [ln for ln in out.splitlines() if "@jobs/import/particles.mrcs" in ln]
        assert len(lines) == 50
        assert all("24 x 24 x 1 x 1" in ln and "angpix = 2" in ln for ln in lines)
        avg = np.array([float(ln.split("avg=")[1].split()[0]) for ln in lines])
        np.testing.assert_allclose(avg, images.mean(axis=(1, 2)), atol=1e-4)
