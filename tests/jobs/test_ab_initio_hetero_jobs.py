"""ab_initio and hetero_refine jobs: contract (outputs, columns, maps with voxel size, half maps
and FSC tables, plots, metrics, checkpoints and resume, input errors) on a tiny simulated set
(tests/kernels/sim3d.py). Accuracy is tested on the engines (tests/kernels/test_abinitio.py, test_hetero.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jobs import registry
from jobs.ab_initio import JOB as AB
from jobs.context import JobContext
from jobs.errors import JobCancelled, JobInputError
from jobs.hetero_refine import JOB as HET
from jobs.io.star import ParticleTables
from jobs.particles import write_particle_set

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
from sim3d import CS, Q0, VOLTAGE, simulate  # noqa: E402

PIXEL, BOX = 8.0, 24


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("abh")
    s = simulate([80, 80], D=BOX, pixel_size=PIXEL, snr=2.0, seed=2)
    ctx = JobContext(name="sim", project_dir=root, work_dir=root / "jobs/sim", final_dir=root / "jobs/sim")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [VOLTAGE],
                           "rlnSphericalAberration": [CS], "rlnAmplitudeContrast": [Q0],
                           "rlnImagePixelSize": [PIXEL]})
    parts = pd.DataFrame({"rlnDefocusU": s.defocus[:, 0], "rlnDefocusV": s.defocus[:, 1],
                          "rlnDefocusAngle": s.defocus[:, 2], "rlnOpticsGroup": 1})
    tables = ParticleTables(optics=optics, particles=parts, source=root / "sim.star")
    return root, write_particle_set(ctx, "particles", tables, [s.images], BOX, PIXEL)


def _ctx(root: Path, name: str, events: list) -> JobContext:
    return JobContext(name=name, project_dir=root, work_dir=root / f"jobs/.tmp/{name}",
                      final_dir=root / f"jobs/{name}", emit=events.append)


AB_PARAMS = dict(num_classes=2, max_res_A=32.0, init_res_A=64.0, num_init_iters=2, num_final_iters=2,
                 radius_step=1.0, batch_size=60, class_similarity_end=3, checkpoint_every=2)


def test_registered() -> None:
    assert registry.get("ab_initio") is AB and registry.get("hetero_refine") is HET


def test_ab_initio_then_hetero(project) -> None:
    root, ps = project
    events: list[dict] = []
    ctx = _ctx(root, "abinit", events)
    out = AB.run(AB.params(**AB_PARAMS, num_particles=120), {"particles": ps}, ctx)
    vols = out["volumes"]
    assert len(vols.volumes) == 2 and vols.box == BOX and vols.pixel_size == PIXEL
    for v in vols.volumes:
        with mrcfile.open(root / v.map.replace("jobs/abinit", "jobs/.tmp/abinit")) as m:
            assert m.data.shape == (BOX,) * 3 and np.isclose(float(m.voxel_size.x), PIXEL)
            assert np.isfinite(m.data).all() and float(np.abs(m.data).max()) > 0
    parts = starfile.read(ctx.work_dir / "particles.star", always_dict=True)["particles"]
    assert len(parts) == 120 and out["particles"].provides >= {"class", "alignments3D", "ctf"}
    for col in ("rlnClassNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnMaxValueProbDistribution", "cdagClassESS"):
        assert np.isfinite(parts[col].to_numpy(float)).all(), col
    assert set(parts["rlnClassNumber"]) <= {1, 2}
    assert (ctx.work_dir / "plots/maps.png").is_file() and (ctx.work_dir / "plots/class_fractions.png").is_file()
    assert (ctx.checkpoint_dir / "state.npz").is_file()
    names = {e["name"] for e in events if e["event"] == "metric"}
    assert {"resolution_A", "class_fractions", "mean_class_ess", "class_sizes"} <= names
    # a rerun resumes from the last checkpoint
    AB.run(AB.params(**AB_PARAMS, num_particles=120), {"particles": ps}, ctx)
    assert any("resuming" in e.get("message", "") for e in events)

    hctx = _ctx(root, "hetero", events)
    vols_final = vols.model_copy(update={"volumes": [
        v.model_copy(update={"map": v.map.replace("jobs/abinit", "jobs/.tmp/abinit")}) for v in vols.volumes]})
    hp = HET.params(refinement_box_size=BOX, initial_lowpass_res_A=48.0, batch_size_per_class=40,
                    num_random_iters=1, max_oem_iters=3, num_final_full_iters=1, chunk_size=100)
    hout = HET.run(hp, {"particles": ps, "volumes": vols_final}, hctx)
    hv = hout["volumes"].volumes
    assert len(hv) == 2 and all(v.half_a and v.half_b and v.fsc for v in hv)
    fsc = starfile.read(hctx.work_dir / Path(hv[0].fsc).name)
    assert {"rlnResolution", "rlnFourierShellCorrelation"} <= set(fsc.columns)
    hp_parts = starfile.read(hctx.work_dir / "particles.star", always_dict=True)["particles"]
    assert len(hp_parts) == ps.count and set(hp_parts["rlnClassNumber"]) <= {1, 2}
    for name in ("maps", "fsc", "class_sizes", "class_fractions"):
        assert (hctx.work_dir / f"plots/{name}.png").is_file(), name
    grey = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "greyscale"]
    assert len(grey) == 1 and len(grey[0]) == 2 and min(grey[0]) > 0
    with pytest.raises(JobInputError, match="use_classes"):
        HET.run(HET.params(use_classes=[3]), {"particles": ps, "volumes": vols_final}, _ctx(root, "bad", events))


def test_ab_initio_rejects_bad_params(project) -> None:
    root, ps = project
    with pytest.raises(JobInputError, match="coarser"):
        AB.run(AB.params(max_res_A=40.0, init_res_A=30.0), {"particles": ps}, _ctx(root, "bad2", []))
    with pytest.raises(ValueError, match="symmetry"):
        AB.params(symmetry="I2")


def test_ab_initio_final_start_choice(project) -> None:
    """start_choice final: each of 2 starts runs the whole schedule, both are scored after it and
    the output is the better one's; a run cancelled inside the second start resumes there (the
    first start's final state comes from the checkpoint) and ends with the same maps."""
    root, ps = project
    params = AB.params(**AB_PARAMS, num_particles=120, num_starts=2, start_choice="final")
    events: list[dict] = []
    ctx = _ctx(root, "abinit_final", events)
    out = AB.run(params, {"particles": ps}, ctx)
    scores = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "start_log_evidence"]
    assert len(scores) == 2 and np.isfinite(scores).all() and scores[0] != scores[1]
    assert any(f"keeping start {int(np.argmax(scores)) + 1}" in e.get("message", "") for e in events)
    steps = [e["iteration"] for e in events if e["event"] == "metric" and e["name"] == "resolution_A"]
    total = len(steps) // 2
    assert steps == list(range(2 * total))

    cancel = root / "jobs/.tmp/abinit_cut/CANCEL"

    class CancelInStart2(list):
        def append(self, e: dict) -> None:
            super().append(e)
            if e["event"] == "metric" and e["name"] == "resolution_A" and e["iteration"] == total + 1:
                cancel.touch()

    with pytest.raises(JobCancelled):
        AB.run(params, {"particles": ps}, _ctx(root, "abinit_cut", CancelInStart2()))
    cancel.unlink()
    log: list[dict] = []
    again = AB.run(params, {"particles": ps}, _ctx(root, "abinit_cut", log))
    assert any("resuming start 2 after iteration 1" in e.get("message", "") for e in log)
    for a, b in zip(out["volumes"].volumes, again["volumes"].volumes, strict=True):
        with mrcfile.open(root / a.map.replace("jobs/", "jobs/.tmp/")) as ma, \
                mrcfile.open(root / b.map.replace("jobs/", "jobs/.tmp/")) as mb:
            assert np.array_equal(ma.data, mb.data)


def test_ab_initio_several_starts(project) -> None:
    """num_starts 3: every start is logged with its log evidence, the run continues from the best
    one (its checkpoint holds the chosen start's class fractions) and ends like a single start."""
    root, ps = project
    events: list[dict] = []
    ctx = _ctx(root, "abinit_starts", events)
    out = AB.run(AB.params(**AB_PARAMS, num_particles=120, num_starts=3), {"particles": ps}, ctx)
    scores = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "start_log_evidence"]
    assert len(scores) == 3 and np.isfinite(scores).all() and len(out["volumes"].volumes) == 2
    assert any("continuing from the start" in e.get("message", "") for e in events)
    with np.load(ctx.checkpoint_dir / "state.npz") as d:
        assert np.allclose(d["fractions"][: AB_PARAMS["num_init_iters"]].sum(axis=1), 1.0)
    steps = sorted(e["iteration"] for e in events if e["event"] == "metric" and e["name"] == "resolution_A")
    assert steps[0] == 0 and steps == sorted(set(steps))
    events.clear()  # a rerun resumes after the starts: none is run again
    AB.run(AB.params(**AB_PARAMS, num_particles=120, num_starts=3), {"particles": ps}, ctx)
    assert not any(e.get("name") == "start_log_evidence" for e in events)
    with pytest.raises(JobInputError, match="num_init_iters"):
        AB.run(AB.params(**{**AB_PARAMS, "num_init_iters": 0}, num_starts=2), {"particles": ps},
               _ctx(root, "bad3", []))
