"""select_3d: keep 3D classes (cryoSPARC "Select 3D classes" / particle sets tools).

Inputs: `particles` with rlnClassNumber (e.g. from hetero_refine or class_3d) and the `volumes`
of the same job (K maps, class k = map k). Either `classes` lists the 1-based class ids to keep, in
the order the output maps take, or `min_fraction` keeps every class holding at least that fraction
of the particles, largest first (a rule that follows a changed upstream: class ids of a stochastic
classification change from run to run, a fixed list then keeps the wrong classes). Outputs:
`particles` (the particles of those classes, in input order, every column unchanged,
rlnClassNumber included; metadata only: same stacks) and `volumes` (the chosen maps, the same
files with their half maps, masks and FSC tables).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from jobs.artifacts import ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from jobs.select_2d import ClassNumber


class Params(JobParams):
    """Class selection, by a list or by size (exactly one); class ids are 1-based rlnClassNumber
    values = map numbers of `volumes`."""

    classes: list[ClassNumber] | None = Field(None, min_length=1,
                                              description="Classes to keep (1-based), in output order")
    min_fraction: float | None = Field(None, gt=0.0, le=1.0, description=(
        "Keep every class holding at least this fraction of the particles, largest class first"))

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"classes {v} repeat a class")
        return v

    @model_validator(mode="after")
    def _one_rule(self) -> Params:
        if (self.classes is None) == (self.min_fraction is None):
            raise ValueError("give exactly one of classes (a list of class ids) and min_fraction")
        return self


def by_size(counts: np.ndarray, min_fraction: float) -> list[int]:
    """1-based ids of the classes with counts (K,) >= min_fraction x their sum, largest first
    (ties by id); JobInputError when none is."""
    least = min_fraction * counts.sum()
    ids = [int(k) + 1 for k in np.argsort(-counts, kind="stable") if counts[k] >= least]
    if not ids:
        raise JobInputError(f"min_fraction {min_fraction:g}: no class holds that fraction of the particles "
                            f"(class sizes {counts.tolist()})")
    return ids


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    vs: VolumeSet = inputs["volumes"]
    K = len(vs.volumes)
    bad = [k for k in params.classes or [] if k > K]
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
    counts = np.bincount(cls.astype(np.int64), minlength=K + 1)[1:]
    if params.min_fraction is None:
        classes, rule = list(params.classes or []), ""
    else:
        classes, rule = by_size(counts, params.min_fraction), f" (each >= {params.min_fraction:g} of the particles)"
    keep = np.isin(cls, classes)
    if not keep.any():
        raise JobInputError(f"classes {classes} hold no particles")
    df = tables.particles[keep].reset_index(drop=True)
    particles = write_particle_star(ctx, "particles", ParticleTables(tables.optics, df, tables.source), ps)
    volumes = VolumeSet(volumes=[vs.volumes[k - 1] for k in classes], box=vs.box, pixel_size=vs.pixel_size,
                        summary={"maps": len(classes), "classes": list(classes)})
    ctx.log.info(f"kept classes {classes}{rule}: {int(keep.sum())} of {len(keep)} particles "
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
