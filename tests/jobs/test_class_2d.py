"""class_2d job: contract (outputs, columns, sorting, plots, metrics, checkpoint) and recovery of
the views of a small simulated ParticleSet (c2d_views, algorithms.md §3.5 data design)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from jobs import registry
from jobs.class_2d import JOB
from jobs.context import JobContext
from jobs.io.star import ParticleTables
from jobs.particles import iter_batches, write_particle_set

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
from c2d_views import CS, Q0, VOLTAGE, simulate  # noqa: E402

PIXEL = 4.0


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, object, np.ndarray]:
    root = tmp_path_factory.mktemp("c2d")
    vs = simulate([60] * 5, D=48, pixel_size=PIXEL, snr=0.2, seed=6)
    ctx = JobContext(name="sim", project_dir=root, work_dir=root / "jobs/sim", final_dir=root / "jobs/sim")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"],
                           "rlnVoltage": [VOLTAGE], "rlnSphericalAberration": [CS],
                           "rlnAmplitudeContrast": [Q0], "rlnImagePixelSize": [PIXEL]})
    parts = pd.DataFrame({"rlnDefocusU": vs.defocus_u, "rlnDefocusV": vs.defocus_v,
                          "rlnDefocusAngle": vs.defocus_angle, "rlnOpticsGroup": 1})
    tables = ParticleTables(optics=optics, particles=parts, source=root / "sim.star")
    ps = write_particle_set(ctx, "particles", tables, [vs.images], 48, PIXEL)
    return root, ps, vs.view


def test_registered() -> None:
    assert registry.get("class_2d") is JOB


def test_class_2d_run(project, run_job) -> None:
    root, ps, view = project
    events: list[dict] = []
    ctx = JobContext(name="c2d", project_dir=root, work_dir=root / "jobs/.tmp/c2d",
                     final_dir=root / "jobs/c2d", emit=events.append)
    params = JOB.params(num_classes=5, max_res_A=16, num_oem_iterations=8, batch_size_per_class=30,
                        sigma_anneal_start_iter=1, sigma_anneal_iters=4, checkpoint_every=4)
    out = JOB.run(params, {"particles": ps}, ctx)
    parts = starfile.read(ctx.work_dir / "particles.star", always_dict=True)["particles"]
    assert out["particles"].provides >= {"class", "alignments2D", "ctf"}
    assert out["particles"].stacks == ps.stacks and out["particles"].count == ps.count
    cls = parts["rlnClassNumber"].to_numpy()
    sizes = np.bincount(cls, minlength=6)[1:]
    assert np.all(np.diff(sizes) <= 0)  # 1 = largest
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution",
                "rlnLogLikeliContribution", "cdagClassESS"):
        assert np.isfinite(parts[col].to_numpy(float)).all(), col
    # every view is the majority of one class and the classes are pure
    M = np.zeros((5, 5), int)
    np.add.at(M, (cls - 1, view), 1)
    assert set(M.argmax(1)) == set(range(5))
    assert M.max(1).sum() / M.sum() >= 0.95
    model = starfile.read(ctx.work_dir / "class_averages.star", always_dict=True)["model_classes"]
    np.testing.assert_array_equal(model["cdagClassSize"].to_numpy(), sizes)
    assert out["class_averages"].num_classes == 5 and out["class_averages"].box == 28
    assert (ctx.work_dir / "plots/class_montage.png").is_file()
    assert (ctx.work_dir / "plots/class_sizes.png").is_file()
    assert (ctx.checkpoint_dir / "state.npz").is_file()
    names = {e["name"] for e in events if e["event"] == "metric"}
    assert {"class_sizes", "mean_class_ess", "log_likelihood", "resolution_A"} <= names
    images = np.concatenate([b[1] for b in iter_batches(ps, root, 100)])
    assert images.shape == (300, 48, 48)
    # a rerun in the same directory resumes from the checkpoint and gives the same classes
    again = JOB.run(params, {"particles": ps}, ctx)
    parts2 = starfile.read(root / again["particles"].star.replace("jobs/c2d", "jobs/.tmp/c2d"),
                           always_dict=True)["particles"]
    assert any("resuming" in e.get("message", "") for e in events)
    assert np.mean(parts2["rlnClassNumber"].to_numpy() == cls) >= 0.99


def test_marginalisation_param() -> None:
    assert JOB.params(force_max_over_poses=False).force_max_over_poses is False
