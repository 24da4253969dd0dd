"""select_2d on synthetic class_2d-like outputs with known class statistics (algorithms.md §4).

S1-style: junk classes (bad resolution, high class ESS, too few particles) are rejected and
good ones kept by the §4 auto rule (n_min = 0.5 N/K, res_max = 2 x best, eca_max = 1.5);
S2: selected + rejected = input exactly, every STAR value unchanged.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pandas as pd
import pydantic
import pytest
import starfile

from jobs.artifacts import ClassAverages2D
from jobs.class_averages import read_class_averages
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import write_particle_set
from jobs.select_2d import JOB

# class number: (size, resolution Å, mean class ESS, members are junk)
CLASSES = {
    1: (80, 7.5, 1.05, False),
    2: (70, 8.0, 1.10, False),
    3: (50, 30.0, 1.20, True),  # fails the resolution rule only
    4: (45, 9.0, 1.15, False),
    5: (30, 12.0, 2.20, True),  # fails the class-ESS rule only
    6: (15, 14.0, 1.30, True),  # fails the size rule only
    7: (10, 40.0, 3.00, True),
}
LEAK = 2  # particles of the other kind in each class
N = sum(c[0] for c in CLASSES.values())
K = len(CLASSES)


def _star_rows(path: Path, block: str = "particles") -> list[tuple[str, ...]]:
    """Data rows of a STAR loop block as tuples of the exact value tokens written."""
    lines = path.read_text().splitlines()
    start = lines.index(f"data_{block}")
    rows = []
    for line in lines[start + 1 :]:
        s = line.strip()
        if s.startswith("data_"):
            break
        if s and not s.startswith(("loop_", "_", "#")):
            rows.append(tuple(s.split()))
    return rows


def make_class2d(project: Path, *, drop_columns: tuple[str, ...] = (), seed: int = 0,
                 table_classes: tuple[int, ...] = tuple(CLASSES),
                 drop_table_columns: tuple[str, ...] = ()) -> SimpleNamespace:
    """Particles (shuffled, with class columns) and a ClassAverages2D, as class_2d writes them."""
    rng = np.random.default_rng(seed)
    cls = np.concatenate([np.full(c[0], k) for k, c in CLASSES.items()])
    junk = np.concatenate([np.r_[np.full(c[0] - LEAK, c[3]), np.full(LEAK, not c[3])]
                           for c in CLASSES.values()])
    ess = np.concatenate([np.clip(c[2] + rng.uniform(-0.05, 0.05, c[0]), 1.0, None)
                          for c in CLASSES.values()])
    perm = rng.permutation(N)
    cls, junk, ess = cls[perm], junk[perm], ess[perm]
    du = rng.uniform(8000, 25000, N)
    columns = {
        "rlnDefocusU": du, "rlnDefocusV": du - rng.uniform(0, 500, N),
        "rlnDefocusAngle": rng.uniform(-180, 180, N),
        "rlnAnglePsi": rng.uniform(-180, 180, N),
        "rlnOriginXAngst": rng.normal(0, 3, N), "rlnOriginYAngst": rng.normal(0, 3, N),
        "rlnClassNumber": cls,
        "rlnMaxValueProbDistribution": rng.uniform(0.3, 1.0, N),
        "rlnLogLikeliContribution": rng.normal(-5e4, 1e3, N),
        "cdagClassESS": ess,
        "rlnOpticsGroup": np.ones(N, dtype=int),
    }
    particles = pd.DataFrame({k: v for k, v in columns.items() if k not in drop_columns})
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0],
        "rlnImagePixelSize": [1.5], "rlnImageSize": [32], "rlnImageDimensionality": [2],
    })
    ctx = JobContext(name="class2d", project_dir=project, work_dir=project / "jobs/.tmp/class2d",
                     final_dir=project / "jobs/class2d")
    images = rng.normal(0, 1, (N, 32, 32)).astype(np.float32)
    ps = write_particle_set(ctx, "particles", ParticleTables(optics, particles, project / "in.star"),
                            [images[:100], images[100:]], 32, 1.5)

    averages = rng.normal(0, 1, (K, 32, 32)).astype(np.float32)
    stack = ctx.path("class_averages.mrcs")
    with mrcfile.new(stack, averages) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = 1.5
    table = pd.DataFrame({
        "rlnReferenceImage": [f"{k:06d}@{ctx.ref(stack)}" for k in CLASSES],
        "rlnClassNumber": list(CLASSES),
        "rlnClassDistribution": [c[0] / N for c in CLASSES.values()],
        "cdagClassSize": [c[0] for c in CLASSES.values()],
        "rlnEstimatedResolution": [c[1] for c in CLASSES.values()],
        "cdagMeanClassESS": [c[2] for c in CLASSES.values()],
    })
    table = table[table["rlnClassNumber"].isin(table_classes)].drop(columns=list(drop_table_columns))
    star = ctx.path("class_averages.star")
    starfile.write({"model_classes": table}, star)
    ca = ClassAverages2D(stack=ctx.ref(stack), star=ctx.ref(star), num_classes=K, box=32,
                         pixel_size=1.5)
    ctx.final_dir.parent.mkdir(parents=True, exist_ok=True)
    ctx.work_dir.rename(ctx.final_dir)
    return SimpleNamespace(inputs={"particles": ps, "class_averages": ca}, junk=junk, cls=cls,
                           averages=averages, star=project / ps.star)


@pytest.fixture
def data(tmp_path: Path) -> SimpleNamespace:
    return make_class2d(tmp_path)


def _names(project: Path, ps) -> np.ndarray:
    return starfile.read(project / ps.star, always_dict=True)["particles"]["rlnImageName"].to_numpy()


def _selected_mask(project: Path, data: SimpleNamespace, out: dict) -> np.ndarray:
    inp = _names(project, data.inputs["particles"])
    return np.isin(inp, _names(project, out["particles"]))


def test_s1_auto_rules_keep_good_reject_junk(tmp_path, data, run_job):
    best = min(c[1] for c in CLASSES.values())
    params = {"min_particles": int(np.ceil(0.5 * N / K)), "max_resolution_A": 2 * best,
              "max_mean_class_ess": 1.5}
    out = run_job(JOB, params, data.inputs, name="select")
    sel = _selected_mask(tmp_path, data, out)
    good_kept = sel[~data.junk].mean()
    junk_rejected = (~sel[data.junk]).mean()
    print(f"S1: good kept {good_kept:.3f}, junk rejected {junk_rejected:.3f}")
    assert good_kept >= 0.95
    assert junk_rejected >= 0.90
    assert set(data.cls[sel]) == {1, 2, 4}
    kept = read_class_averages(out["class_averages"], tmp_path)
    assert kept.numbers.tolist() == [1, 2, 4]
    assert kept.table["cdagOriginalClassNumber"].tolist() == [1, 2, 4]
    np.testing.assert_array_equal(kept.images, data.averages[[0, 1, 3]])
    assert kept.table["rlnEstimatedResolution"].tolist() == [7.5, 8.0, 9.0]
    assert (tmp_path / "jobs/select/plots/selection.png").stat().st_size > 1000


def test_s2_bookkeeping_bit_exact(tmp_path, data, run_job):
    out = run_job(JOB, {"max_resolution_A": 13.0, "particle_rule": "posterior>=0.5"},
                  data.inputs, name="select")
    rows_in = _star_rows(data.star)
    rows_sel = _star_rows(tmp_path / out["particles"].star)
    rows_rej = _star_rows(tmp_path / out["rejected"].star)
    assert len(rows_sel) + len(rows_rej) == len(rows_in) == N
    assert sorted(rows_sel + rows_rej) == sorted(rows_in)  # partition: no loss, no duplicates
    assert len(set(rows_in)) == N
    sel = _selected_mask(tmp_path, data, out)
    assert rows_sel == [r for r, s in zip(rows_in, sel, strict=True) if s]  # order kept
    assert rows_rej == [r for r, s in zip(rows_in, sel, strict=True) if not s]
    assert _star_rows(tmp_path / out["particles"].star, "optics") == _star_rows(data.star, "optics")
    for slot in ("particles", "rejected"):
        assert out[slot].stacks == data.inputs["particles"].stacks  # images not copied
        assert out[slot].provides == data.inputs["particles"].provides
    assert [p.name for p in (tmp_path / "jobs/select").glob("*.mrcs")] == ["class_averages.mrcs"]
    assert out["particles"].count == int(sel.sum())
    maxp = starfile.read(data.star, always_dict=True)["particles"]["rlnMaxValueProbDistribution"]
    expected = np.isin(data.cls, [1, 2, 4, 5]) & (maxp.to_numpy() >= 0.5)
    np.testing.assert_array_equal(sel, expected)


@pytest.mark.parametrize(
    ("params", "classes"),
    [
        ({"keep_classes": [3, 1]}, [1, 3]),
        ({"drop_classes": [2, 7]}, [1, 3, 4, 5, 6]),
        ({"mode": "interactive", "keep_classes": [2, 4, 6], "min_particles": 20}, [2, 4]),
    ],
)
def test_keep_and_drop_lists(tmp_path, data, run_job, params, classes):
    out = run_job(JOB, params, data.inputs, name="select")
    sel = _selected_mask(tmp_path, data, out)
    np.testing.assert_array_equal(sel, np.isin(data.cls, classes))
    assert read_class_averages(out["class_averages"], tmp_path).numbers.tolist() == classes


def test_metrics_and_plots(tmp_path, data):
    events: list[dict] = []
    ctx = JobContext(name="sel", project_dir=tmp_path, work_dir=tmp_path / "jobs/sel",
                     final_dir=tmp_path / "jobs/sel", emit=events.append)
    JOB.run(JOB.params(drop_classes=[3, 5]), data.inputs, ctx)
    metrics = {e["name"]: e["value"] for e in events if e["event"] == "metric"}
    assert metrics["selected_classes"] == [1, 2, 4, 6, 7]
    assert metrics["rejected_classes"] == [3, 5]
    assert metrics["selected_particles"] + metrics["rejected_particles"] == N
    assert metrics["rejected_particles"] == 80
    plots = {e["name"] for e in events if e["event"] == "plot"}
    assert plots == {"selection", "selection_sizes"}


def test_param_validation():
    with pytest.raises(pydantic.ValidationError, match="both keep_classes and drop_classes"):
        JOB.params(keep_classes=[1, 2], drop_classes=[2])
    with pytest.raises(pydantic.ValidationError):
        JOB.params(keep_classes=[0])
    with pytest.raises(pydantic.ValidationError):
        JOB.params(particle_rule="posterior>0.9")
    assert JOB.params(keep_classes=[3, 1, 3]).keep_classes == [1, 3]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"keep_classes": [1, 9]}, r"keep_classes: classes \[9\]"),
        ({"drop_classes": [12]}, r"drop_classes: classes \[12\]"),
        ({"min_particles": 1000}, "rejects every class"),
        ({"max_mean_class_ess": 1.0 + 1e-9, "keep_classes": [7]}, "rejects every class"),
    ],
)
def test_input_errors(data, run_job, params, match):
    with pytest.raises(JobInputError, match=match):
        run_job(JOB, params, data.inputs)


def test_missing_columns(tmp_path, run_job):
    data = make_class2d(tmp_path, drop_columns=("rlnMaxValueProbDistribution", "cdagClassESS"),
                        drop_table_columns=("rlnEstimatedResolution",))
    with pytest.raises(JobInputError, match="rlnMaxValueProbDistribution"):
        run_job(JOB, {"particle_rule": "posterior>=0.5"}, data.inputs)
    with pytest.raises(JobInputError, match="cdagClassESS"):
        run_job(JOB, {"max_mean_class_ess": 1.5}, data.inputs)
    with pytest.raises(JobInputError, match="max_resolution_A: .* no rlnEstimatedResolution"):
        run_job(JOB, {"max_resolution_A": 10.0}, data.inputs)


def test_particles_and_classes_must_match(tmp_path, run_job):
    data = make_class2d(tmp_path, table_classes=(1, 2))
    with pytest.raises(JobInputError, match=r"rlnClassNumber \d is not one of the 2 class averages"):
        run_job(JOB, {}, data.inputs)
