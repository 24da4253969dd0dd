"""remove_duplicates: drop picks closer than a minimum separation on the same micrograph.

Each particle's position is its pick (rlnCoordinateX/Y, micrograph px) moved to the particle
centre found by alignment (minus rlnOriginX/YAngst, as RELION and cryoSPARC do), in Å. Of any
two particles on one micrograph closer than `min_separation_A`, the higher-scoring one is kept
(greedy by score: kernels.duplicates). Score: `score_column`, by default
rlnMaxValueProbDistribution if present, else rlnAutopickFigureOfMerit, else the earlier
particle wins. Outputs `particles` (kept) and `removed` partition the input, in input order,
over the same stacks (metadata only).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field

from jobs.artifacts import ParticleSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from kernels.duplicates import duplicate_keep_mask

#: Default score columns, in order of preference.
SCORE_COLUMNS = ("rlnMaxValueProbDistribution", "rlnAutopickFigureOfMerit")
COORDS = ("rlnCoordinateX", "rlnCoordinateY")
ORIGINS = ("rlnOriginXAngst", "rlnOriginYAngst")


class Params(JobParams):
    """Duplicate removal; distances in Å on the micrograph."""

    min_separation_A: float = Field(
        100.0, gt=0, description="Particles on one micrograph closer than this are duplicates"
    )
    score_column: str | None = Field(
        None, description="Higher is kept; default rlnMaxValueProbDistribution, else "
        "rlnAutopickFigureOfMerit, else the earlier particle"
    )
    use_alignments: bool = Field(
        True, description="Measure between aligned particle centres (coordinate - origin)"
    )
    coordinate_pixel_size_A: float | None = Field(
        None, gt=0, description="Micrograph pixel size of the coordinates (default: "
        "rlnMicrographPixelSize, else rlnImagePixelSize)"
    )


def _centres_angst(tables: ParticleTables, params: Params, ctx: JobContext) -> np.ndarray:
    """(N, 2) particle centres on their micrographs, Å."""
    if params.coordinate_pixel_size_A is not None:
        pixel = np.full(len(tables), params.coordinate_pixel_size_A)
    elif tables.has("rlnMicrographPixelSize"):
        pixel = tables.numeric("rlnMicrographPixelSize")
    else:
        pixel = tables.numeric("rlnImagePixelSize")
        ctx.log.warning(f"{tables.source}: no rlnMicrographPixelSize; taking coordinates in "
                        "rlnImagePixelSize pixels (set coordinate_pixel_size_A if binned)")
    xy = np.stack([tables.numeric(c) for c in COORDS], axis=1) * pixel[:, None]
    if params.use_alignments and all(tables.has(c) for c in ORIGINS):
        xy -= np.stack([tables.numeric(c) for c in ORIGINS], axis=1)
    return xy


def _scores(tables: ParticleTables, params: Params) -> tuple[str | None, np.ndarray | None]:
    if params.score_column is not None:
        if not tables.has(params.score_column):
            raise JobInputError(f"{tables.source}: no score column {params.score_column}")
        name = params.score_column
    else:
        name = next((c for c in SCORE_COLUMNS if tables.has(c)), None)
    if name is None:
        return None, None
    return name, pd.to_numeric(pd.Series(tables.column(name)), errors="coerce").to_numpy(float)


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, ParticleSet]:
    source: ParticleSet = inputs["particles"]
    tables = read_tables(source, ctx.project_dir)
    missing = [c for c in ("rlnMicrographName", *COORDS) if c not in tables.particles]
    if missing:
        raise JobInputError(f"{tables.source}: missing column {missing[0]} (remove_duplicates "
                            "needs micrograph coordinates)")
    xy = _centres_angst(tables, params, ctx)
    score_name, scores = _scores(tables, params)
    groups = pd.factorize(tables.particles["rlnMicrographName"].astype(str))[0]
    keep = duplicate_keep_mask(xy, scores, groups, params.min_separation_A)
    removed = int((~keep).sum())
    ctx.log.info(
        f"removed {removed} of {len(keep)} particles closer than {params.min_separation_A:g} Å "
        f"on {groups.max() + 1 if len(groups) else 0} micrographs; kept the higher "
        f"{score_name or 'earlier particle (no score column)'}"
    )
    ctx.metric("removed", removed)
    ctx.metric("kept", int(keep.sum()))

    def subset(mask: np.ndarray) -> ParticleTables:
        return ParticleTables(optics=tables.optics, source=tables.source,
                              particles=tables.particles[mask].reset_index(drop=True))

    return {
        "particles": write_particle_star(ctx, "particles", subset(keep), source),
        "removed": write_particle_star(ctx, "removed", subset(~keep), source),
    }


JOB = JobType(
    name="remove_duplicates",
    params=Params,
    inputs={"particles": Slot(ParticleSet, requires=frozenset({"coordinates"}),
                              help="Particles with rlnMicrographName and rlnCoordinateX/Y")},
    outputs={"particles": ParticleSet, "removed": ParticleSet},
    version=1,
    run=run,
    summary="Remove duplicate picks closer than a minimum separation, keeping the higher score",
    passes={"particles": "particles", "removed": "particles"},
)
