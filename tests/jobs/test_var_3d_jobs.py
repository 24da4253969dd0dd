"""var_3d and var_3d_display jobs: contract (outputs, columns, maps with voxel size and mask, plots,
metrics, checkpoint and resume after a cancellation, input errors) on a small continuous set
(tests/kernels/sim3d.simulate_linear: 400 particles, D = 24 at 8 Å/px, one domain's density
x (1 + 0.5 t), SNR 2, true poses in the STAR). Accuracy is tested on the engines
(tests/kernels/test_var3d.py); here a loose gate on corr(latent 1, t) checks the STAR pose and
shift conventions (measured 0.90 at the 24 Å working box of these tests, 3 iterations)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jobs import registry
from jobs.artifacts import Mask, ParticleSet, VolumeSet
from jobs.context import JobContext
from jobs.errors import JobCancelled, JobInputError
from jobs.io.mrc import write_mrc
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_set, write_particle_star
from jobs.var_3d import JOB as VAR
from jobs.var_3d_display import JOB as DISPLAY
from jobs.volumes import MapOut, write_volume_set
from kernels.masks import threshold_mask
from kernels.rotations import matrix_to_euler

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
from sim3d import CS, Q0, VOLTAGE, simulate_linear  # noqa: E402

PIXEL, BOX, N, K = 8.0, 24, 400, 2
PARAMS = dict(num_components=K, num_iterations=3, filter_res_A=24.0, per_particle_scale="none",
              target_resolution_A=24.0, chunk_size=150, mask_near_A=8.0, mask_far_A=24.0)


def _ctx(root: Path, name: str, emit: Callable[[dict], None] = lambda e: None) -> JobContext:
    return JobContext(name=name, project_dir=root, work_dir=root / f"jobs/.tmp/{name}",
                      final_dir=root / f"jobs/{name}", emit=emit)


def _finish(ctx: JobContext) -> None:
    """What the orchestrator does after a job returns: rename work_dir to final_dir."""
    ctx.final_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ctx.work_dir, ctx.final_dir)


def _read(root: Path, rel: str) -> np.ndarray:
    with mrcfile.open(root / rel) as m:
        assert np.isclose(float(m.voxel_size.x), PIXEL)
        return np.asarray(m.data)


def _particles(root: Path, ps: ParticleSet) -> pd.DataFrame:
    return starfile.read(root / ps.star, always_dict=True)["particles"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict, np.ndarray]:
    """Particles, consensus V(0) and a solvent mask; returns (root, inputs, true t)."""
    root = tmp_path_factory.mktemp("var3d")
    s = simulate_linear(N, D=BOX, pixel_size=PIXEL, snr=2.0, seed=2, scale=0.5)
    d = s.data
    ctx = JobContext(name="sim", project_dir=root, work_dir=root / "jobs/sim", final_dir=root / "jobs/sim")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [VOLTAGE],
                           "rlnSphericalAberration": [CS], "rlnAmplitudeContrast": [Q0],
                           "rlnImagePixelSize": [PIXEL]})
    rot, tilt, psi = matrix_to_euler(d.R)
    parts = pd.DataFrame({"rlnDefocusU": d.defocus[:, 0], "rlnDefocusV": d.defocus[:, 1],
                          "rlnDefocusAngle": d.defocus[:, 2], "rlnOpticsGroup": 1,
                          "rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi,
                          "rlnOriginXAngst": -d.shift[:, 0] * PIXEL, "rlnOriginYAngst": -d.shift[:, 1] * PIXEL,
                          "rlnRandomSubset": np.arange(N) % 2 + 1})
    tables = ParticleTables(optics=optics, particles=parts, source=root / "sim.star")
    ps = write_particle_set(ctx, "particles", tables, [d.images], BOX, PIXEL)
    path = ctx.path("mask.mrc")
    write_mrc(path, threshold_mask(d.maps[1], 0.2, 1.0, 3.0), PIXEL)
    inputs = {"particles": ps, "volumes": write_volume_set(ctx, "consensus", [MapOut(d.maps[1])], PIXEL),
              "mask": Mask(map=ctx.ref(path), box=BOX, pixel_size=PIXEL)}
    return root, inputs, s.t


@pytest.fixture(scope="module")
def var_run(project) -> tuple[JobContext, dict, list[dict]]:
    root, inputs, _ = project
    events: list[dict] = []
    ctx = _ctx(root, "var", events.append)
    out = VAR.run(VAR.params(**PARAMS), inputs, ctx)
    _finish(ctx)
    return ctx, out, events


def test_registered() -> None:
    assert registry.get("var_3d") is VAR and registry.get("var_3d_display") is DISPLAY
    assert set(VAR.inputs) == {"particles", "volumes", "mask"} and VAR.inputs["volumes"].optional
    assert DISPLAY.inputs["particles"].requires >= {"latent", "alignments3D", "ctf"}
    assert VAR.adds["particles"] == frozenset({"latent"})


def test_var_3d_outputs(project, var_run) -> None:
    root, inputs, t = project
    ctx, out, events = var_run
    vols: VolumeSet = out["volumes"]
    assert len(vols.volumes) == K + 1 and vols.box == BOX and vols.pixel_size == PIXEL
    assert vols.summary["num_components"] == K and len(vols.summary["eigenvalues"]) == K
    maps = [_read(root, v.map) for v in vols.volumes]
    assert all(m.shape == (BOX,) * 3 and np.isfinite(m).all() and np.abs(m).max() > 0 for m in maps)
    assert all(v.mask == vols.volumes[0].mask for v in vols.volumes)
    mask = _read(root, vols.volumes[0].mask)
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    ps: ParticleSet = out["particles"]
    assert ps.provides >= {"latent", "alignments3D", "ctf"} and ps.count == N
    parts = _particles(root, ps)
    src = read_tables(inputs["particles"], root).particles
    assert np.allclose(parts["rlnAngleRot"], src["rlnAngleRot"]) and np.allclose(parts["rlnOriginXAngst"],
                                                                                  src["rlnOriginXAngst"])
    for k in range(1, K + 1):
        assert np.isfinite(parts[f"cdagLatent{k}"]).all() and (parts[f"cdagLatentStd{k}"] > 0).all()
    assert np.allclose(parts["cdagScale"], 1.0)
    c = abs(float(np.corrcoef(parts["cdagLatent1"], t)[0, 1]))
    print(f"var_3d job: |corr(latent 1, t)| {c:.3f}, eigenvalues {vols.summary['eigenvalues']}")
    assert c >= 0.7, "pose or shift convention broken"
    assert abs(float(np.corrcoef(parts["cdagLatent2"], t)[0, 1])) < 0.3
    for name in ("components", "latents", "convergence"):
        assert (ctx.final_dir / f"plots/{name}.png").is_file(), name
    metrics = {e["name"] for e in events if e["event"] == "metric"}
    assert {"eigenvalues", "subspace_change", "loglik_gain", "eigenvalues_final", "latent_std"} <= metrics
    assert (ctx.final_dir / "checkpoints/state.npz").is_file()


def test_var_3d_resume(project, var_run) -> None:
    """Cancelled after iteration 1 and run again: resumes and equals the uninterrupted run."""
    root, inputs, _ = project
    cancel = root / "jobs/.tmp/resumed/CANCEL"

    def emit(e: dict) -> None:
        if e["event"] == "metric" and e["name"] == "loglik_gain" and e["iteration"] == 1:
            cancel.touch()

    with pytest.raises(JobCancelled):
        VAR.run(VAR.params(**PARAMS), inputs, _ctx(root, "resumed", emit))
    cancel.unlink()
    log: list[dict] = []
    rctx = _ctx(root, "resumed", log.append)
    out = VAR.run(VAR.params(**PARAMS), inputs, rctx)
    _finish(rctx)
    assert any("resuming after 2 iterations" in e.get("message", "") for e in log)
    again, first = _particles(root, out["particles"]), _particles(root, var_run[1]["particles"])
    assert np.allclose(again["cdagLatent1"], first["cdagLatent1"]) and np.allclose(again["cdagLatent2"],
                                                                                   first["cdagLatent2"])


def test_var_3d_minimal_inputs(project) -> None:
    """Particles only: reconstructed consensus, automatic mask, optimal scales and a highpass."""
    root, inputs, t = project
    params = {**PARAMS, "per_particle_scale": "optimal", "highpass_res_A": 100.0, "num_components": 1}
    ctx = _ctx(root, "minimal")
    out = VAR.run(VAR.params(**params), {"particles": inputs["particles"]}, ctx)
    _finish(ctx)
    parts = _particles(root, out["particles"])
    assert len(out["volumes"].volumes) == 2 and (parts["cdagScale"] > 0).all()
    c = abs(float(np.corrcoef(parts["cdagLatent1"], t)[0, 1]))
    print(f"minimal inputs: |corr(latent 1, t)| {c:.3f}")
    assert c >= 0.5


def test_var_3d_input_errors(project) -> None:
    root, inputs, _ = project

    def run(params: dict, extra: dict, name: str) -> None:
        VAR.run(VAR.params(**{**PARAMS, **params}), {**inputs, **extra}, _ctx(root, name))

    with pytest.raises(JobInputError, match="cdagScale"):
        run({"per_particle_scale": "input"}, {}, "e1")
    with pytest.raises(JobInputError, match="does not match"):
        run({}, {"mask": inputs["mask"].model_copy(update={"pixel_size": 4.0})}, "e2")
    with pytest.raises(JobInputError, match="coarser"):
        run({"highpass_res_A": 20.0}, {}, "e3")
    ctx = JobContext(name="subsets", project_dir=root, work_dir=root / "jobs/subsets",
                     final_dir=root / "jobs/subsets")
    t = read_tables(inputs["particles"], root)
    few = ParticleTables(optics=t.optics, particles=t.particles.iloc[:5], source=t.source)
    with pytest.raises(JobInputError, match="too few"):
        run({}, {"particles": write_particle_star(ctx, "few", few, inputs["particles"])}, "e4")
    bare = ParticleTables(optics=t.optics, particles=t.particles.drop(columns=["rlnAngleTilt"]), source=t.source)
    with pytest.raises(JobInputError, match="3D alignments"):
        run({}, {"particles": write_particle_star(ctx, "bare", bare, inputs["particles"])}, "e5")
    with pytest.raises(ValueError, match="num_components"):
        VAR.params(num_components=0)


def _display(root: Path, var_out: dict, params: dict, name: str, extra: dict | None = None,
             events: list[dict] | None = None) -> tuple[JobContext, dict]:
    ctx = _ctx(root, name, (events.append if events is not None else lambda e: None))
    inputs = {"volumes": var_out["volumes"], "particles": var_out["particles"], **(extra or {})}
    out = DISPLAY.run(DISPLAY.params(**params), inputs, ctx)
    _finish(ctx)
    return ctx, out


def test_display_simple_exact(project, var_run) -> None:
    """Simple mode: frame j of component k is V0 + c_j V_k (read back from the MRC files), c_j
    evenly spaced between the 3rd and 97th percentile of the particles' latents."""
    root = project[0]
    vout = var_run[1]
    ctx, out = _display(root, vout, {"output_mode": "simple", "num_frames": 5}, "simple")
    maps = [_read(root, v.map) for v in out["volumes"].volumes]
    assert len(maps) == 5 * K and out["volumes"].summary["mode"] == "simple"
    mean, comps = _read(root, vout["volumes"].volumes[0].map), [_read(root, v.map) for v in vout["volumes"].volumes[1:]]
    z = _particles(root, vout["particles"])[[f"cdagLatent{k}" for k in range(1, K + 1)]].to_numpy()
    for k in range(K):
        c = np.linspace(*np.percentile(z[:, k], [3, 97]), 5)
        for j in (0, 4):
            assert np.allclose(maps[5 * k + j], mean + np.float32(c[j]) * comps[k], atol=1e-5)
    cls = _particles(root, out["particles"])["rlnClassNumber"].to_numpy()
    assert set(cls) <= set(range(1, 6)) and out["particles"].provides >= {"class", "latent"}
    assert (ctx.final_dir / "plots/frames.png").is_file() and (ctx.final_dir / "plots/latents.png").is_file()


def test_display_intermediates(project, var_run) -> None:
    """Intermediates along component 1 (4 frames, window 2): reconstructed frames with FSC tables;
    the last frame minus the first points along +V_1 (inside the mask)."""
    root, inputs, _ = project
    vout = var_run[1]
    events: list[dict] = []
    _, out = _display(root, vout, {"output_mode": "intermediates", "num_frames": 4, "components": [1],
                                     "target_resolution_A": 24.0}, "inter", {"mask": inputs["mask"]}, events)
    vols = out["volumes"].volumes
    assert len(vols) == 4 and all(v.fsc and v.resolution_A is not None for v in vols)
    maps = [_read(root, v.map) for v in vols]
    comp, mask = _read(root, vout["volumes"].volumes[1].map), _read(root, vout["volumes"].volumes[0].mask)
    step = float(((maps[-1] - maps[0]) * comp * mask).sum())
    print(f"intermediates: (last - first frame) . V_1 = {step:.3g}")
    assert step > 0
    counts = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "map_particles"][0]
    assert len(counts) == 4 and min(counts) >= 0.02 * N


def test_display_cluster(project, var_run) -> None:
    """Cluster mode (3 clusters on both latents): particles get rlnClassNumber 1..3 and the cluster
    probability; clusters are ordered along latent 1; one map per cluster."""
    root = project[0]
    vout = var_run[1]
    events: list[dict] = []
    _, out = _display(root, vout, {"output_mode": "cluster", "num_frames": 3, "target_resolution_A": 24.0},
                        "cluster", None, events)
    assert len(out["volumes"].volumes) == 3
    parts = _particles(root, out["particles"])
    cls = parts["rlnClassNumber"].to_numpy()
    assert set(cls) == {1, 2, 3} and ((parts["rlnMaxValueProbDistribution"] > 0.3).all())
    z1 = parts["cdagLatent1"].to_numpy()
    means = [z1[cls == c].mean() for c in (1, 2, 3)]
    assert means[0] < means[2]
    sizes = [e["value"] for e in events if e["event"] == "metric" and e["name"] == "cluster_sizes"][0]
    assert sizes == np.bincount(cls, minlength=4)[1:].tolist()


def test_display_input_errors(project, var_run) -> None:
    root, inputs, _ = project
    vout = var_run[1]
    with pytest.raises(JobInputError, match="components"):
        _display(root, vout, {"components": [3]}, "d1")
    with pytest.raises(JobInputError, match="latent columns"):
        _display(root, {**vout, "particles": inputs["particles"]}, {}, "d2")
    with pytest.raises(JobInputError, match="mean and at least one component"):
        _display(root, {**vout, "volumes": inputs["volumes"]}, {}, "d3")
    with pytest.raises(ValueError, match="intermediates_window"):
        DISPLAY.params(intermediates_window=-0.5)


def test_var_3d_warns_beyond_consensus(project, var_run) -> None:
    """Fitting the components finer than the consensus map's resolution is logged as a warning
    (the mean lacks that band); a consensus without a resolution gives none."""
    root, inputs, _ = project
    sctx = JobContext(name="coarse", project_dir=root, work_dir=root / "jobs/coarse", final_dir=root / "jobs/coarse")
    full = _read(root, inputs["volumes"].volumes[0].map)
    coarse = write_volume_set(sctx, "consensus", [MapOut(full, resolution_A=40.0)], PIXEL)
    log: list[dict] = []
    ctx = _ctx(root, "coarse_run", log.append)
    VAR.run(VAR.params(**{**PARAMS, "num_iterations": 1, "num_components": 1}), {**inputs, "volumes": coarse}, ctx)
    warned = [e["message"] for e in log if "consensus map holds" in e.get("message", "")]
    assert len(warned) == 1 and "holds 40 Å" in warned[0] and "fitted to 24 Å" in warned[0]
    assert not any("consensus map holds" in e.get("message", "") for e in var_run[2])
