"""rebalance_2d: view grouping of class averages and per-superclass caps (algorithms.md §4).

Class averages are rotated (and shifted, one mirrored) noisy copies of four distinct blob
"views"; the superclasses must be exactly those views, and caps must be respected with
selected + removed = input and every input column unchanged.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jobs.artifacts import ClassAverages2D
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import write_particle_set
from jobs.rebalance_2d import JOB, view_similarity
from kernels import backend

D, PIXEL = 32, 3.0
# per class: (view, particles, mirrored)
LAYOUT = [("A", 60, False), ("A", 60, False), ("A", 60, True), ("A", 60, False), ("A", 60, False),
          ("B", 30, False), ("B", 30, False), ("B", 30, False), ("C", 40, False), ("D", 20, False)]
SIZES = {"A": 300, "B": 90, "C": 40, "D": 20}
N = sum(n for _, n, _ in LAYOUT)


def _blobs(rng: np.random.Generator, n: int = 8) -> np.ndarray:
    """(n, 4) blobs: x, y (px from the centre), sigma (px), amplitude."""
    r = 0.3 * D * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(a), r * np.sin(a), rng.uniform(1.5, 2.5, n),
                     rng.uniform(0.5, 1.5, n)], axis=1)


def _render(blobs: np.ndarray, angle_deg: float, shift: np.ndarray, mirror: bool) -> np.ndarray:
    """The blob image mirrored (x -> -x), rotated about the centre D//2 and shifted (px)."""
    x, y = blobs[:, 0] * (-1 if mirror else 1), blobs[:, 1]
    t = np.deg2rad(angle_deg)
    xr, yr = np.cos(t) * x - np.sin(t) * y + shift[0], np.sin(t) * x + np.cos(t) * y + shift[1]
    c = np.arange(D) - D // 2
    gy, gx = np.meshgrid(c, c, indexing="ij")
    img = sum(a * np.exp(-((gx - px) ** 2 + (gy - py) ** 2) / (2 * s**2))
              for px, py, s, a in zip(xr, yr, blobs[:, 2], blobs[:, 3], strict=True))
    return img.astype(np.float32)


def class_averages(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    views = {v: _blobs(rng) for v in SIZES}
    images = np.stack([
        _render(views[v], rng.uniform(0, 360), rng.uniform(-1.5, 1.5, 2), mirrored)
        for v, _, mirrored in LAYOUT
    ])
    images += rng.normal(0, 0.05 * images.max(), images.shape).astype(np.float32)
    return images, [v for v, _, _ in LAYOUT]


def make_inputs(project: Path, seed: int = 0) -> SimpleNamespace:
    """A class_2d-like ParticleSet (shuffled, class column) and ClassAverages2D on disk."""
    rng = np.random.default_rng(seed)
    averages, views = class_averages(seed)
    cls = rng.permutation(np.concatenate([np.full(n, k + 1) for k, (_, n, _) in enumerate(LAYOUT)]))
    particles = pd.DataFrame({
        "rlnDefocusU": rng.uniform(8000, 25000, N), "rlnDefocusV": rng.uniform(8000, 25000, N),
        "rlnDefocusAngle": rng.uniform(-180, 180, N), "rlnAnglePsi": rng.uniform(-180, 180, N),
        "rlnOriginXAngst": rng.normal(0, 3, N), "rlnOriginYAngst": rng.normal(0, 3, N),
        "rlnClassNumber": cls, "rlnOpticsGroup": np.ones(N, dtype=int),
    })
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnAmplitudeContrast": [0.1], "rlnSphericalAberration": [2.7], "rlnVoltage": [300.0],
        "rlnImagePixelSize": [PIXEL], "rlnImageSize": [D], "rlnImageDimensionality": [2],
    })
    ctx = JobContext(name="class2d", project_dir=project, work_dir=project / "jobs/class2d",
                     final_dir=project / "jobs/class2d")
    images = rng.normal(0, 1, (N, D, D)).astype(np.float32)
    ps = write_particle_set(ctx, "particles", ParticleTables(optics, particles, project / "in.star"),
                            [images], D, PIXEL)
    stack = ctx.path("class_averages.mrcs")
    with mrcfile.new(stack, averages) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = PIXEL
    table = pd.DataFrame({
        "rlnReferenceImage": [f"{k + 1:06d}@{ctx.ref(stack)}" for k in range(len(LAYOUT))],
        "rlnClassNumber": np.arange(1, len(LAYOUT) + 1),
        "rlnEstimatedResolution": rng.uniform(8, 12, len(LAYOUT)),
    })
    star = ctx.path("class_averages.star")
    starfile.write({"model_classes": table}, star)
    ca = ClassAverages2D(stack=ctx.ref(stack), star=ctx.ref(star), num_classes=len(LAYOUT),
                         box=D, pixel_size=PIXEL)
    return SimpleNamespace(inputs={"particles": ps, "class_averages": ca}, cls=cls, views=views,
                           star=project / ps.star)


@pytest.fixture
def data(tmp_path: Path) -> SimpleNamespace:
    return make_inputs(tmp_path)


def run(project: Path, data: SimpleNamespace, name: str = "rebalance", seed: int = 0,
        **params) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame]:
    """Run the job; return outputs, metrics, kept and removed particle tables."""
    events: list[dict] = []
    ctx = JobContext(name=name, project_dir=project, work_dir=project / "jobs" / name,
                     final_dir=project / "jobs" / name, seed=seed, emit=events.append)
    out = JOB.run(JOB.params(seed=seed, max_resolution_A=10.0, **params), data.inputs, ctx)
    metrics = {e["name"]: e["value"] for e in events if e["event"] == "metric"}
    read = {s: starfile.read(project / out[s].star, always_dict=True)["particles"]
            for s in ("particles", "removed")}
    return out, metrics, read["particles"], read["removed"]


def test_similarity_rotation_shift_mirror_invariant():
    images, views = class_averages()
    v = np.array(views)
    sim = view_similarity(images, PIXEL, 10.0, 5.0, mirrors=True)
    same = v[:, None] == v[None, :]
    off = ~np.eye(len(v), dtype=bool)
    within, between = sim[same & off], sim[~same]
    print(f"similarity within views min {within.min():.3f}, between views max {between.max():.3f}")
    assert within.min() >= 0.9
    assert between.max() < within.min() - 0.1
    plain = view_similarity(images, PIXEL, 10.0, 5.0, mirrors=False)
    rotated = [0, 1, 3, 4]  # view A's unmirrored copies; class 3 (index 2) is mirrored
    print(f"mirrored copy vs its view: {plain[2, rotated].max():.3f} without mirrors, "
          f"{sim[2, rotated].min():.3f} with")
    # without mirror search the mirrored copy is less like its view than any rotated copy
    assert plain[2, rotated].max() < plain[np.ix_(rotated, rotated)][off[:4, :4]].min() - 0.03
    assert np.allclose(plain[np.ix_(rotated, rotated)], sim[np.ix_(rotated, rotated)], atol=0.02)


def test_superclasses_are_the_views(tmp_path, data):
    _, metrics, kept, removed = run(tmp_path, data, num_superclasses=4)
    groups = np.array(metrics["superclass_of_class"])
    views = np.array([v for v, _, _ in LAYOUT])
    for v, g in (("A", 1), ("B", 2), ("C", 3), ("D", 4)):  # numbered by particle count
        assert set(groups[views == v]) == {g}
    assert metrics["superclass_sizes_before"] == [300, 90, 40, 20]
    assert metrics["superclass_sizes_after"] == [300, 90, 40, 20]  # no cap: clustering only
    assert len(kept) == N and len(removed) == 0
    np.testing.assert_array_equal(kept["cdagSuperclass"], groups[data.cls - 1])
    assert (tmp_path / "jobs/rebalance/plots/superclasses.png").stat().st_size > 1000
    assert (tmp_path / "jobs/rebalance/plots/superclass_sizes.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("params", "cap"),
    [
        ({"max_particles_per_superclass": 100}, 100),
        ({"max_fraction_per_superclass": 0.2}, 90),  # floor(0.2 * 450)
        ({"rebalance_factor": 0.5}, 40),  # smallest group 20 / 0.5
        ({"rebalance_factor": 0.5, "max_particles_per_superclass": 35}, 35),
    ],
)
def test_caps_respected_and_bookkeeping(tmp_path, data, params, cap):
    out, metrics, kept, removed = run(tmp_path, data, num_superclasses=4, **params)
    before = np.array([300, 90, 40, 20])
    after = np.minimum(before, cap)
    assert metrics["cap"] == cap
    assert metrics["superclass_sizes_after"] == after.tolist()
    assert np.bincount(kept["cdagSuperclass"], minlength=5)[1:].tolist() == after.tolist()
    assert len(kept) == after.sum() and len(removed) == N - after.sum()
    # partition of the input, in input order, every input column unchanged
    inp = starfile.read(data.star, always_dict=True)["particles"]
    both = pd.concat([kept, removed]).drop(columns="cdagSuperclass")
    assert both["rlnImageName"].is_unique
    merged = inp.merge(both, on="rlnImageName", suffixes=("", "_out"), validate="one_to_one")
    assert len(merged) == N
    for col in inp.columns.drop("rlnImageName"):
        np.testing.assert_array_equal(merged[col].to_numpy(), merged[f"{col}_out"].to_numpy())
    pos = pd.Index(inp["rlnImageName"])
    assert pos.get_indexer(kept["rlnImageName"]).tolist() == sorted(
        pos.get_indexer(kept["rlnImageName"]).tolist())
    assert out["particles"].stacks == data.inputs["particles"].stacks


def test_seed_determinism(tmp_path, data):
    kept = [run(tmp_path, data, name=f"r{i}", seed=s, num_superclasses=4,
                max_particles_per_superclass=100)[2]["rlnImageName"].tolist()
            for i, s in enumerate((1, 1, 2))]
    assert kept[0] == kept[1]
    assert kept[0] != kept[2]


def test_input_errors(tmp_path, data):
    with pytest.raises(JobInputError, match="max_fraction_per_superclass"):
        run(tmp_path, data, max_fraction_per_superclass=1e-3)
    _, metrics, _, _ = run(tmp_path, data, name="many", num_superclasses=50)
    assert sorted(set(metrics["superclass_of_class"])) == list(range(1, len(LAYOUT) + 1))


def test_after_select_2d(tmp_path, data):
    """select_2d's outputs (original class numbers, a subset of classes) feed rebalance_2d."""
    from jobs import select_2d

    ctx = JobContext(name="select", project_dir=tmp_path, work_dir=tmp_path / "jobs/select",
                     final_dir=tmp_path / "jobs/select")
    selected = select_2d.run(select_2d.JOB.params(drop_classes=[2, 10]), data.inputs, ctx)
    data.inputs = {"particles": selected["particles"], "class_averages": selected["class_averages"]}
    _, metrics, kept, removed = run(tmp_path, data, num_superclasses=3,
                                    max_particles_per_superclass=150)
    assert metrics["superclass_sizes_before"] == [240, 90, 40]
    assert metrics["superclass_sizes_after"] == [150, 90, 40]
    assert set(kept["rlnClassNumber"]) | set(removed["rlnClassNumber"]) == {1, 3, 4, 5, 6, 7, 8, 9}


@pytest.mark.gpu
@pytest.mark.skipif(not backend.cupy_available(), reason="CuPy with a usable GPU is not available")
def test_gpu_similarity_parity():
    import cupy as cp

    images, _ = class_averages()
    cpu = view_similarity(images, PIXEL, 10.0, 5.0, mirrors=True)
    gpu = view_similarity(cp.asarray(images), PIXEL, 10.0, 5.0, mirrors=True)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
