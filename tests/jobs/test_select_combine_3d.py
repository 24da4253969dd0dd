"""select_3d and combine_volumes: contract (outputs, order, resampling, columns kept) and input errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydantic
import pytest

from jobs import registry
from jobs.artifacts import ParticleSet, VolumeSet
from jobs.combine_volumes import JOB as COMBINE
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_set
from jobs.select_3d import JOB as SELECT
from jobs.volumes import MapOut, read_maps, write_volume_set

BOX, PIXEL, N = 16, 4.0, 30


def _ctx(root: Path, name: str) -> JobContext:
    return JobContext(name=name, project_dir=root, work_dir=root / f"jobs/{name}", final_dir=root / f"jobs/{name}")


def _maps(root: Path, name: str, k: int, box: int = BOX, pixel: float = PIXEL) -> VolumeSet:
    rng = np.random.default_rng(k + box)
    return write_volume_set(_ctx(root, name), "map", [MapOut(rng.normal(size=(box,) * 3).astype(np.float32))
                                                      for _ in range(k)], pixel)


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, ParticleSet, VolumeSet]:
    """30 particles in classes 1..3 (10 each, interleaved) and the 3 class maps."""
    ctx = _ctx(tmp_path, "classify")
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnImagePixelSize": [PIXEL],
                           "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    parts = pd.DataFrame({"rlnOpticsGroup": 1, "rlnClassNumber": np.arange(N) % 3 + 1, "rlnDefocusU": np.arange(N)})
    images = np.random.default_rng(0).normal(size=(N, BOX, BOX)).astype(np.float32)
    ps = write_particle_set(ctx, "particles", ParticleTables(optics, parts, tmp_path / "x.star"), [images], BOX, PIXEL)
    return tmp_path, ps, _maps(tmp_path, "classify_maps", 3)


def test_registered() -> None:
    assert registry.get("select_3d") is SELECT
    assert registry.get("combine_volumes") is COMBINE
    assert set(COMBINE.inputs) == {"volumes", "volumes_2", "volumes_3", "volumes_4"}
    assert [COMBINE.inputs[s].optional for s in COMBINE.inputs] == [False, True, True, True]


def test_select_3d_keeps_classes_and_maps(project: tuple[Path, ParticleSet, VolumeSet]) -> None:
    root, ps, vs = project
    out = SELECT.run(SELECT.params(classes=[3, 1]), {"particles": ps, "volumes": vs}, _ctx(root, "sel"))
    df = read_tables(out["particles"], root).particles
    assert out["particles"].count == 20 and sorted(set(df["rlnClassNumber"])) == [1, 3]
    assert df["rlnDefocusU"].tolist() == [i for i in range(N) if i % 3 != 1]  # input order, columns kept
    assert out["particles"].stacks == ps.stacks
    assert [v.map for v in out["volumes"].volumes] == [vs.volumes[2].map, vs.volumes[0].map]
    assert out["volumes"].box == BOX and out["volumes"].pixel_size == PIXEL


@pytest.mark.parametrize(("classes", "match"), [([4], "has 3 maps"), ([2, 5], r"\[5\]")])
def test_select_3d_bad_ids(project: tuple[Path, ParticleSet, VolumeSet], classes: list[int], match: str) -> None:
    root, ps, vs = project
    with pytest.raises(JobInputError, match=match):
        SELECT.run(SELECT.params(classes=classes), {"particles": ps, "volumes": vs}, _ctx(root, "sel"))


def test_select_3d_by_size(project: tuple[Path, ParticleSet, VolumeSet]) -> None:
    """min_fraction keeps the classes holding that fraction of the particles, largest first."""
    root, ps, vs = project
    tables = read_tables(ps, root)
    tables.particles["rlnClassNumber"] = [3] * 16 + [1] * 10 + [2] * 4   # 16 / 10 / 4 of 30
    uneven = write_particle_set(_ctx(root, "uneven"), "particles", tables, [np.zeros((N, BOX, BOX), np.float32)],
                                BOX, PIXEL)
    run = lambda f: SELECT.run(SELECT.params(min_fraction=f), {"particles": uneven, "volumes": vs},  # noqa: E731
                               _ctx(root, f"sel{f}"))
    out = run(0.3)
    assert out["particles"].count == 26 and out["volumes"].summary["classes"] == [3, 1]
    assert [v.map for v in out["volumes"].volumes] == [vs.volumes[2].map, vs.volumes[0].map]
    assert run(0.1)["volumes"].summary["classes"] == [3, 1, 2]
    with pytest.raises(JobInputError, match=r"min_fraction 0.6: no class .*\[10, 4, 16\]"):
        run(0.6)


def test_select_3d_invalid_params_and_mismatch(project: tuple[Path, ParticleSet, VolumeSet]) -> None:
    root, ps, _ = project
    for bad in ({"classes": []}, {"classes": [0]}, {"classes": [1, 1]}, {}, {"classes": [1], "min_fraction": 0.1},
                {"min_fraction": 0.0}, {"min_fraction": 1.5}):
        with pytest.raises(pydantic.ValidationError):
            SELECT.params(**bad)
    two = _maps(root, "two", 2)
    with pytest.raises(JobInputError, match="rlnClassNumber 3 is not a class"):
        SELECT.run(SELECT.params(classes=[1]), {"particles": ps, "volumes": two}, _ctx(root, "sel"))


def test_combine_volumes_order_and_resampling(tmp_path: Path) -> None:
    one, three, big = _maps(tmp_path, "one", 1), _maps(tmp_path, "three", 3), _maps(tmp_path, "big", 2, 32, 2.0)
    ctx = _ctx(tmp_path, "comb")
    out = COMBINE.run(COMBINE.params(use_2=[3, 1]), {"volumes": one, "volumes_2": three, "volumes_3": big}, ctx)
    vs = out["volumes"]
    assert len(vs.volumes) == 5 and vs.box == BOX and vs.pixel_size == PIXEL
    got = read_maps(vs, tmp_path)
    src = read_maps(one, tmp_path) + [read_maps(three, tmp_path)[k] for k in (2, 0)]
    for g, s in zip(got[:3], src, strict=True):
        np.testing.assert_array_equal(g, s)
    assert all(m.shape == (BOX,) * 3 for m in got)
    assert vs.summary["maps"] == 5


def test_combine_volumes_errors(tmp_path: Path) -> None:
    one, three = _maps(tmp_path, "one", 1), _maps(tmp_path, "three", 3)
    run: Callable[..., object] = lambda params, inputs: COMBINE.run(  # noqa: E731
        COMBINE.params(**params), inputs, _ctx(tmp_path, "comb"))
    with pytest.raises(JobInputError, match="use_2 \\[4\\]: input 'volumes_2' has 3 maps"):
        run({"use_2": [4]}, {"volumes": one, "volumes_2": three})
    with pytest.raises(JobInputError, match="use_3 .* not wired"):
        run({"use_3": [1]}, {"volumes": one, "volumes_2": three})
    with pytest.raises(JobInputError, match="does not match"):
        run({}, {"volumes": one, "volumes_2": _maps(tmp_path, "odd", 1, 16, 3.0)})
    with pytest.raises(pydantic.ValidationError):
        COMBINE.params(use=[2, 2])
