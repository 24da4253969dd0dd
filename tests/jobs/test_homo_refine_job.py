"""homo_refine job: contract (outputs, columns, maps with voxel size, half maps, mask, FSC table
columns, sharpened map, plots, metrics, checkpoint and resume, input errors) on a tiny simulated
set (tests/kernels/sim3d.py) refined in a smaller box. Accuracy is tested on the engine
(tests/kernels/test_homo.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jobs import registry
from jobs.artifacts import Mask
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.homo_refine import FSC_COLUMNS
from jobs.homo_refine import JOB as HOMO
from jobs.io.mrc import write_mrc
from jobs.io.star import ParticleTables
from jobs.particles import write_particle_set
from jobs.volumes import MapOut, write_volume_set
from kernels.fourier import lowpass

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
from sim3d import CS, Q0, VOLTAGE, simulate  # noqa: E402

PIXEL, BOX, N = 5.0, 24, 120
PARAMS = dict(refinement_box_size=16, max_iters=3, local_search_step_deg=7.5, dynamic_mask_start_res_A=100.0,
              minimize_over_per_particle_scale=True, alignment_mode="marginalization", chunk_size=50)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("homo")
    s = simulate([N], D=BOX, pixel_size=PIXEL, snr=2.0, seed=4)
    ctx = JobContext(name="sim", project_dir=root, work_dir=root / "jobs/sim", final_dir=root / "jobs/sim")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [VOLTAGE],
                           "rlnSphericalAberration": [CS], "rlnAmplitudeContrast": [Q0],
                           "rlnImagePixelSize": [PIXEL]})
    subset = np.random.default_rng(1).integers(1, 3, N)
    parts = pd.DataFrame({"rlnDefocusU": s.defocus[:, 0], "rlnDefocusV": s.defocus[:, 1],
                          "rlnDefocusAngle": s.defocus[:, 2], "rlnOpticsGroup": 1, "rlnRandomSubset": subset})
    tables = ParticleTables(optics=optics, particles=parts, source=root / "sim.star")
    ps = write_particle_set(ctx, "particles", tables, [s.images], BOX, PIXEL)
    vols = write_volume_set(ctx, "init", [MapOut(lowpass(s.maps[0], 4.0, 2.0)), MapOut(s.maps[0])], PIXEL)
    write_mrc(ctx.path("mask.mrc"), np.ones((BOX,) * 3, np.float32), PIXEL)
    mask = Mask(map=ctx.ref(ctx.path("mask.mrc")), box=BOX, pixel_size=PIXEL)
    return root, ps, vols, mask, subset


def _ctx(root: Path, name: str, events: list) -> JobContext:
    return JobContext(name=name, project_dir=root, work_dir=root / f"jobs/.tmp/{name}",
                      final_dir=root / f"jobs/{name}", emit=events.append)


def _file(ctx: JobContext, ref: str) -> Path:
    return ctx.work_dir / Path(ref).name


def test_registered() -> None:
    assert registry.get("homo_refine") is HOMO


def test_homo_refine_outputs_and_resume(project) -> None:
    root, ps, vols, _, subset = project
    events: list[dict] = []
    ctx = _ctx(root, "homo", events)
    out = HOMO.run(HOMO.params(**PARAMS), {"particles": ps, "volumes": vols}, ctx)
    assert set(out) == {"volumes", "sharpened", "mask", "particles"}
    vs = out["volumes"]
    assert len(vs.volumes) == 1 and vs.box == BOX and vs.pixel_size == PIXEL
    v = vs.volumes[0]
    assert v.half_a and v.half_b and v.mask and v.fsc and v.resolution_A and np.isfinite(v.resolution_A)
    assert vs.summary["resolution_A"] == pytest.approx(v.resolution_A, abs=1e-3)
    for ref in (v.map, v.half_a, v.half_b, v.mask, out["sharpened"].volumes[0].map):
        with mrcfile.open(_file(ctx, ref)) as m:
            assert m.data.shape == (BOX,) * 3 and np.isclose(float(m.voxel_size.x), PIXEL)
            assert np.isfinite(m.data).all() and float(np.abs(m.data).max()) > 0
    with mrcfile.open(_file(ctx, v.mask)) as m:
        assert float(m.data.min()) >= 0.0 and float(m.data.max()) <= 1.0
    assert out["mask"].map == v.mask and out["mask"].box == BOX
    fsc = starfile.read(_file(ctx, v.fsc))
    assert len(fsc) == 8 and {"rlnResolution", "rlnFourierShellCorrelation", *FSC_COLUMNS.values()} <= set(fsc.columns)
    assert np.allclose(fsc["rlnFourierShellCorrelation"], fsc["rlnFourierShellCorrelationCorrected"])

    parts = starfile.read(ctx.work_dir / "particles.star", always_dict=True)["particles"]
    assert len(parts) == N and out["particles"].provides >= {"alignments3D", "ctf"}
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnMaxValueProbDistribution", "cdagScale"):
        assert np.isfinite(parts[col].to_numpy(float)).all(), col
    assert (parts["rlnRandomSubset"].to_numpy() == subset).all()  # the input split is kept
    assert (parts["cdagScale"] > 0).all() and parts["cdagScale"].mean() == pytest.approx(1.0)
    for name in ("fsc", "maps", "scales"):
        assert (ctx.work_dir / f"plots/{name}.png").is_file(), name
    names = {e["name"] for e in events if e["event"] == "metric"}
    assert {"resolution_A", "band_shells", "step_deg", "angle_change_deg", "final_resolution_A", "greyscale"} <= names
    per_iter = [e["iteration"] for e in events if e["event"] == "metric" and e["name"] == "resolution_A"]
    assert per_iter == sorted(per_iter) and len(per_iter) >= 2
    assert (ctx.checkpoint_dir / "state.npz").is_file()

    with mrcfile.open(_file(ctx, v.map)) as m:
        first = np.array(m.data)
    again = HOMO.run(HOMO.params(**PARAMS), {"particles": ps, "volumes": vols}, ctx)
    assert any("resuming" in e.get("message", "") for e in events)
    assert again["volumes"].volumes[0].resolution_A == v.resolution_A
    with mrcfile.open(_file(ctx, v.map)) as m:
        assert np.array_equal(m.data, first)


def test_homo_refine_rejects_bad_input(project) -> None:
    root, ps, vols, mask, _ = project
    inputs = {"particles": ps, "volumes": vols}
    cases = [(dict(volume_index=3), inputs, "volume_index"),
             (dict(mask_mode="static"), inputs, "needs a mask"),
             (dict(mask_mode="dynamic"), {**inputs, "mask": mask}, "mask input"),
             (dict(dynamic_mask_near_A=20.0), inputs, "must exceed")]
    for k, (params, ins, match) in enumerate(cases):
        with pytest.raises(JobInputError, match=match):
            HOMO.run(HOMO.params(**params), ins, _ctx(root, f"bad{k}", []))
    with pytest.raises(ValueError, match="symmetry"):
        HOMO.params(symmetry="X3")


def test_symmetry_without_mask(project) -> None:
    """C2 about z (mask 'none', maximisation, no per-particle scale, particles' box): the maps
    are symmetric under (x, y) -> (-x, -y) about the box centre (a 180° rotation maps the
    Fourier grid onto itself, so the symmetrised accumulators are exactly symmetric; the planes
    x = 0 and y = 0 have their partners outside the box, cropped from the padded grid)."""
    root, ps, vols, _, _ = project
    ctx = _ctx(root, "homo_c2", [])
    out = HOMO.run(HOMO.params(max_iters=1, symmetry="C2", mask_mode="none", local_search_step_deg=7.5),
                   {"particles": ps, "volumes": vols}, ctx)
    v = out["volumes"].volumes[0]
    for ref in (v.map, v.half_a):
        with mrcfile.open(_file(ctx, ref)) as m:
            vol = np.array(m.data)[:, 1:, 1:]
        assert np.abs(np.flip(vol, axis=(1, 2)) - vol).max() <= 1e-4 * np.abs(vol).max()
    parts = starfile.read(ctx.work_dir / "particles.star", always_dict=True)["particles"]
    assert (parts["cdagScale"] == 1.0).all()
