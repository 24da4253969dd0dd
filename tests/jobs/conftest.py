"""Fixtures for job tests: small particle datasets (STAR/.cs + MRC stacks) and job contexts."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from jobs.context import JobContext

BOX = 32
COUNT = 50
PIXEL = 1.5


@dataclass
class ParticleData:
    """A synthetic particle dataset written under `root` (a RELION-like project directory)."""

    root: Path
    images: np.ndarray  # (N, D, D) float32, in particle order
    names: list[str]  # rlnImageName, relative to root
    stacks: list[Path]
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # per-particle RELION columns
    pixel_size: float = PIXEL

    @property
    def count(self) -> int:
        return len(self.images)


def write_stacks(
    root: Path, images: np.ndarray, split: tuple[int, ...], voxel_size: float, subdir: str
) -> tuple[list[str], list[Path]]:
    """Write `images` as consecutive stacks of the given sizes; return rlnImageNames, paths."""
    names, paths, start = [], [], 0
    (root / subdir).mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(split):
        rel = f"{subdir}/stack{k}.mrcs"
        with mrcfile.new(root / rel, images[start : start + n].astype(np.float32)) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = voxel_size
        names += [f"{i + 1:06d}@{rel}" for i in range(n)]
        paths.append(root / rel)
        start += n
    return names, paths


def particle_columns(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random CTF, pose, shift (Å), half-set and class columns in RELION units."""
    du = rng.uniform(8000, 25000, n)
    return {
        "rlnDefocusU": du,
        "rlnDefocusV": du - rng.uniform(0, 500, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnAngleRot": rng.uniform(-180, 180, n),
        "rlnAngleTilt": rng.uniform(1, 179, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-4, 4, n),
        "rlnOriginYAngst": rng.uniform(-4, 4, n),
        "rlnRandomSubset": rng.integers(1, 3, n),
        "rlnClassNumber": rng.integers(1, 4, n),
    }


def optics_table(pixel_size: float = PIXEL, box: int = BOX) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnAmplitudeContrast": [0.1],
            "rlnSphericalAberration": [2.7],
            "rlnVoltage": [300.0],
            "rlnImagePixelSize": [pixel_size],
            "rlnImageSize": [box],
            "rlnImageDimensionality": [2],
        }
    )


def write_star31(path: Path, data: ParticleData, extra: dict | None = None) -> Path:
    """RELION 3.1 particle STAR for `data` (extra: more particle columns)."""
    particles = pd.DataFrame({"rlnImageName": data.names, **data.columns, **(extra or {})})
    particles["rlnOpticsGroup"] = 1
    optics = optics_table(data.pixel_size, data.images.shape[-1])
    starfile.write({"optics": optics, "particles": particles}, path)
    return path


def write_star30(path: Path, data: ParticleData, optics: bool = True) -> Path:
    """RELION 3.0 single-table STAR: per-particle optics, rlnOriginX/Y in px, no optics table."""
    cols = {k: v for k, v in data.columns.items() if not k.startswith("rlnOrigin")}
    particles = pd.DataFrame({"rlnImageName": data.names, **cols})
    particles["rlnOriginX"] = data.columns["rlnOriginXAngst"] / data.pixel_size
    particles["rlnOriginY"] = data.columns["rlnOriginYAngst"] / data.pixel_size
    particles["rlnDetectorPixelSize"] = 5.0
    particles["rlnMagnification"] = 5.0e4 / data.pixel_size
    if optics:
        particles["rlnVoltage"] = 300.0
        particles["rlnSphericalAberration"] = 2.7
        particles["rlnAmplitudeContrast"] = 0.1
    starfile.write(particles, path)
    return path


def make_particles(
    root: Path,
    seed: int = 0,
    count: int = COUNT,
    box: int = BOX,
    split: tuple[int, ...] = (30, 20),
    images: np.ndarray | None = None,
    subdir: str = "Extract/job007",
) -> ParticleData:
    rng = np.random.default_rng(seed)
    if images is None:
        images = rng.normal(2.0, 3.0, (count, box, box)).astype(np.float32)
    names, stacks = write_stacks(root, images, split, PIXEL, subdir)
    return ParticleData(root, images, names, stacks, particle_columns(count, rng))


@pytest.fixture
def particles_data(tmp_path: Path) -> ParticleData:
    """50 noise particles (D=32, 1.5 Å/px) in two stacks under <tmp>/relion/Extract/job007."""
    return make_particles(tmp_path / "relion")


def job_context(project: Path, name: str) -> JobContext:
    return JobContext(
        name=name,
        project_dir=project,
        work_dir=project / "jobs" / ".tmp" / name,
        final_dir=project / "jobs" / name,
    )


def finish(ctx: JobContext) -> None:
    """What the orchestrator does after a job returns: rename work_dir to final_dir."""
    ctx.final_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(ctx.work_dir, ctx.final_dir)


@pytest.fixture
def run_job(tmp_path: Path) -> Callable:
    """run_job(job, params, inputs, name) -> outputs, with the job directory renamed into place."""
    counter = iter(range(1000))

    def _run(job, params: dict, inputs: dict | None = None, name: str | None = None) -> dict:
        ctx = job_context(tmp_path, name or f"job{next(counter):03d}")
        outputs = job.run(job.params(**params), inputs or {}, ctx)
        finish(ctx)
        return outputs

    return _run


@pytest.fixture
def pio() -> SimpleNamespace:
    """This module's helpers and constants, for tests (test modules cannot import conftest)."""
    return SimpleNamespace(
        BOX=BOX, COUNT=COUNT, PIXEL=PIXEL, make_particles=make_particles,
        write_stacks=write_stacks, write_star31=write_star31, write_star30=write_star30,
        optics_table=optics_table, job_context=job_context, finish=finish,
    )
