"""select_3d: keep 3D classes (cryoSPARC "Select 3D classes" / particle sets tools).

Inputs: `particles` with rlnClassNumber (e.g. from hetero_refine or class_3d) and the `volumes`
of the same job (K maps, class k = map k). `classes` lists the 1-based class ids to keep, in the
order the output maps take. Outputs: `particles` (the particles of those classes, in input
order, every column unchanged, rlnClassNumber included; metadata only: same stacks) and
`volumes` (the chosen maps, the same files with their half maps, masks and FSC tables).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator

from jobs.artifacts import ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from jobs.select_2d import ClassNumber


class Params(JobParams):
    """Class selection; class ids are 1-based rlnClassNumber values = map numbers of `volumes`."""

    classes: list[ClassNumber] = Field(min_length=1, description="Classes to keep (1-based), in output order")

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"classes {v} repeat a class")
        return v


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    vs: VolumeSet = inputs["volumes"]
    K = len(vs.volumes)
    bad = [k for k in params.classes if k > K]
    if bad:
        raise JobInputError(f"classes {bad}: the volumes input has {K} maps (classes 1..{K})")
    tables = read_tables(ps, ctx.project_dir)
    if not tables.has("rlnClassNumber"):
        raise JobInputError(f"{tables.source}: particles lack rlnClassNumber; wire a classification's particles")
    cls = tables.numeric("rlnClassNumber")
    outside = np.flatnonzero(~np.isin(cls, np.arange(1, K + 1)))
    if outside.size:
        raise JobInputError(f"{tables.row(int(outside[0]))}: rlnClassNumber {cls[outside[0]]:g} is not a class of "
                            f"the volumes input (1..{K}); wire the volumes of the job that classified them")
    keep = np.isin(cls, params.classes)
    if not keep.any():
        raise JobInputError(f"classes {params.classes} hold no particles")
    df = tables.particles[keep].reset_index(drop=True)
    particles = write_particle_star(ctx, "particles", ParticleTables(tables.optics, df, tables.source), ps)
    counts = np.bincount(cls.astype(np.int64), minlength=K + 1)[1:]
    volumes = VolumeSet(volumes=[vs.volumes[k - 1] for k in params.classes], box=vs.box, pixel_size=vs.pixel_size,
                        summary={"maps": len(params.classes), "classes": list(params.classes)})
    ctx.log.info(f"kept classes {params.classes}: {int(keep.sum())} of {len(keep)} particles "
                 f"(class sizes {counts.tolist()})")
    ctx.metric("selected_particles", int(keep.sum()))
    ctx.metric("rejected_particles", int((~keep).sum()))
    ctx.metric("class_sizes", counts.tolist())
    return {"particles": particles, "volumes": volumes}


JOB = JobType(
    name="select_3d",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"class"}), help="3D-classified particles (rlnClassNumber)"),
            "volumes": Slot(VolumeSet, help="The class maps of the same job (map k = class k)")},
    outputs={"particles": ParticleSet, "volumes": VolumeSet},
    version=1,
    run=run,
    summary="Select 3D classes: the particles and maps of the chosen classes",
    passes={"particles": "particles"},
)
