"""jobs.io (STAR, MRC, .cs readers/writers) and jobs.particles (batched access, writers)."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

import jobs.particles as particles_mod
from jobs.errors import JobInputError
from jobs.io.mrc import StackReader, StackWriter, read_stack_header
from jobs.io.star import OpticsDefaults, ParticleTables, parse_image_names, read_particles_star
from jobs.particles import iter_batches, provides_of, write_particle_set, write_particle_star


def test_read_star31_keeps_columns(particles_data, tmp_path, pio):
    star = pio.write_star31(tmp_path / "p.star", particles_data)
    t = read_particles_star(star)
    assert len(t) == particles_data.count
    assert list(t.optics["rlnOpticsGroup"]) == [1]
    for col, values in particles_data.columns.items():
        np.testing.assert_allclose(t.particles[col].to_numpy(), values, atol=1e-5)
    np.testing.assert_allclose(t.column("rlnVoltage"), 300.0)
    assert provides_of(t) == {"ctf", "alignments2D", "alignments3D", "class"}


def test_read_star30_converts_optics_and_origins(particles_data, tmp_path, pio):
    star = pio.write_star30(tmp_path / "p30.star", particles_data)
    t = read_particles_star(star)
    assert len(t.optics) == 1
    assert t.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(pio.PIXEL, rel=1e-6)
    assert "rlnOriginX" not in t.particles and "rlnMagnification" not in t.particles
    for ax in "XY":
        np.testing.assert_allclose(
            t.particles[f"rlnOrigin{ax}Angst"], particles_data.columns[f"rlnOrigin{ax}Angst"],
            atol=1e-5,
        )


def test_read_star30_optics_groups_and_defaults(particles_data, tmp_path, pio):
    star = pio.write_star30(tmp_path / "p30.star", particles_data, optics=False)
    with pytest.raises(JobInputError, match=r"p30\.star.*rlnVoltage.*voltage_kv"):
        read_particles_star(star, OpticsDefaults(cs_mm=2.7, amplitude_contrast=0.1))
    df = starfile.read(star)
    df["rlnVoltage"] = np.where(np.arange(len(df)) < 10, 200.0, 300.0)
    starfile.write(df, star, overwrite=True)
    t = read_particles_star(star, OpticsDefaults(cs_mm=2.7, amplitude_contrast=0.1))
    assert sorted(t.optics["rlnVoltage"]) == [200.0, 300.0]
    np.testing.assert_array_equal(t.column("rlnVoltage"), df["rlnVoltage"].to_numpy())
    np.testing.assert_allclose(t.column("rlnSphericalAberration"), 2.7)


def test_parse_image_names_errors(particles_data, tmp_path, pio):
    t = read_particles_star(pio.write_star31(tmp_path / "p.star", particles_data))
    index, paths = parse_image_names(t)
    assert index[0] == 0 and index[29] == 29 and index[30] == 0
    assert paths[0] == "Extract/job007/stack0.mrcs" and paths[30] == "Extract/job007/stack1.mrcs"
    t.particles.loc[6, "rlnImageName"] = "0@Extract/job007/stack0.mrcs"
    with pytest.raises(JobInputError, match=r"p\.star, row 7: image index 0"):
        parse_image_names(t)
    t.particles.loc[6, "rlnImageName"] = "x@y@z"
    with pytest.raises(JobInputError, match=r"row 7: malformed"):
        parse_image_names(t)


def test_read_star31_optics_group_checks(particles_data, tmp_path, pio):
    star = pio.write_star31(tmp_path / "p.star", particles_data)
    blocks = starfile.read(star)
    parts = blocks["particles"].drop(columns=["rlnOpticsGroup"])
    starfile.write({"optics": blocks["optics"], "particles": parts}, star, overwrite=True)
    assert (read_particles_star(star).column("rlnVoltage") == 300.0).all()
    parts["rlnOpticsGroup"] = np.where(np.arange(50) == 20, 2, 1)
    starfile.write({"optics": blocks["optics"], "particles": parts}, star, overwrite=True)
    with pytest.raises(JobInputError, match=r"p\.star, row 21: rlnOpticsGroup 2 is not in"):
        read_particles_star(star)


def test_read_star_errors(tmp_path):
    with pytest.raises(JobInputError, match="not found"):
        read_particles_star(tmp_path / "missing.star")
    bad = tmp_path / "bad.star"
    starfile.write(pd.DataFrame({"rlnMicrographName": ["a.mrc"]}), bad)
    with pytest.raises(JobInputError, match="no particle table"):
        read_particles_star(bad)


def test_stack_header_and_truncated(particles_data, pio):
    h = read_stack_header(particles_data.stacks[0])
    assert (h.n, h.ny, h.nx) == (30, 32, 32) and h.voxel_size_A == pytest.approx(pio.PIXEL)
    cut = particles_data.stacks[0].with_name("cut.mrcs")
    cut.write_bytes(particles_data.stacks[0].read_bytes()[:-4096])
    with pytest.raises(JobInputError, match=r"cut\.mrcs: not a readable MRC"):
        read_stack_header(cut)
    with pytest.raises(JobInputError, match="not found"):
        read_stack_header(cut.with_name("nothing.mrcs"))


def test_stack_writer_streams_with_header_stats(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(1.0, 2.0, (10, 16, 16)).astype(np.float32)
    with StackWriter(tmp_path / "w.mrcs", 10, 16, 2.5) as w:
        for b in (data[:3], data[3:7], data[7:]):
            w.write(b)
    with mrcfile.open(tmp_path / "w.mrcs") as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        assert mrc.voxel_size.x == pytest.approx(2.5)
        assert mrc.header.dmean == pytest.approx(data.mean(), abs=1e-5)
        assert mrc.header.rms == pytest.approx(data.std(), rel=1e-5)
        assert mrc.header.dmax == pytest.approx(data.max())
        assert mrc.is_image_stack()


def test_stack_reader_gathers_in_order(particles_data):
    paths = np.array([str(p) for p in particles_data.stacks], dtype=object)[[1, 0, 1, 0]]
    index = np.array([3, 29, 0, 5])
    with StackReader() as r:
        out = r.gather(paths, index)
    expect = particles_data.images[[33, 29, 30, 5]]
    np.testing.assert_array_equal(out, expect)


def _tables(pio, data, source: Path) -> ParticleTables:
    return read_particles_star(pio.write_star31(source, data))


def test_write_particle_set_multi_stack_and_iter_batches(tmp_path, monkeypatch, pio):
    data = pio.make_particles(tmp_path / "src", seed=3)
    tables = _tables(pio, data, tmp_path / "src" / "in.star")
    monkeypatch.setattr(particles_mod, "MAX_STACK_BYTES", 20 * 32 * 32 * 4)
    ctx = pio.job_context(tmp_path, "w")
    batches = (data.images[i : i + 7] for i in range(0, data.count, 7))
    ps = write_particle_set(ctx, "particles", tables, batches, 32, pio.PIXEL)
    pio.finish(ctx)
    assert len(ps.stacks) == 3 and ps.count == 50 and ps.box == 32
    assert ps.stacks[0] == "jobs/w/particles_000.mrcs"
    assert ps.provides == {"ctf", "alignments2D", "alignments3D", "class"}
    got, seen = [], []
    for idx, images, meta in iter_batches(ps, tmp_path, 16, ["rlnDefocusU", "rlnVoltage"]):
        assert images.dtype == np.float32 and set(meta) == {"rlnDefocusU", "rlnVoltage"}
        got.append(images)
        seen.append(idx)
        np.testing.assert_allclose(meta["rlnDefocusU"], data.columns["rlnDefocusU"][idx], atol=1e-5)
        np.testing.assert_allclose(meta["rlnVoltage"], 300.0)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(50))
    np.testing.assert_array_equal(np.concatenate(got), data.images)
    out = starfile.read(tmp_path / ps.star)
    assert out["particles"]["rlnImageName"].iloc[20] == "000001@jobs/w/particles_001.mrcs"
    assert out["particles"]["rlnImageOriginalName"].iloc[0] == data.names[0]


def test_write_particle_set_count_mismatch(tmp_path, pio):
    data = pio.make_particles(tmp_path / "src", seed=4)
    tables = _tables(pio, data, tmp_path / "src" / "in.star")
    ctx = pio.job_context(tmp_path, "short")
    with pytest.raises(ValueError, match="fewer images"):
        write_particle_set(ctx, "particles", tables, [data.images[:40]], 32, pio.PIXEL)
    with pytest.raises(ValueError, match="more images"):
        write_particle_set(ctx, "particles", tables, [data.images, data.images[:1]], 32, pio.PIXEL)


def test_write_particle_star_reuses_stacks(tmp_path, pio):
    data = pio.make_particles(tmp_path / "src", seed=5)
    tables = _tables(pio, data, tmp_path / "src" / "in.star")
    ctx = pio.job_context(tmp_path, "a")
    ps = write_particle_set(ctx, "particles", tables, [data.images], 32, pio.PIXEL)
    pio.finish(ctx)
    t2 = particles_mod.read_tables(ps, tmp_path)
    t2.particles = t2.particles.drop(columns=["rlnClassNumber"])
    ctx2 = pio.job_context(tmp_path, "b")
    ps2 = write_particle_star(ctx2, "particles", t2, ps)
    pio.finish(ctx2)
    assert ps2.stacks == ps.stacks and ps2.star == "jobs/b/particles.star"
    assert "class" not in ps2.provides
    images = np.concatenate([b[1] for b in iter_batches(ps2, tmp_path, 50)])
    np.testing.assert_array_equal(images, data.images)
