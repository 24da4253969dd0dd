"""select_2d: keep 2D classes by explicit lists and rules; split the particles accordingly.

algorithms.md §4. A class k is kept when all of these hold (rules left at None are off):
  * k is in `keep_classes` (when given) and not in `drop_classes`;
  * N_k >= `min_particles` (N_k = hard count: particles whose rlnClassNumber is k);
  * rlnEstimatedResolution_k <= `max_resolution_A` (a non-finite resolution fails);
  * mean cdagClassESS of the class's particles <= `max_mean_class_ess` (an empty class fails).
A particle is selected when its class (rlnClassNumber, the argmax class) is kept; with
`particle_rule="posterior>=0.5"` also its rlnMaxValueProbDistribution must be >= 0.5.

Outputs: `particles` (selected) and `rejected` partition the input exactly, in input order,
with every column unchanged (metadata only: same stacks, same rlnImageName); `class_averages`
holds the kept classes' images and table rows with their original rlnClassNumber (so they
still match the particles) and cdagOriginalClassNumber.

`mode="interactive"`: the orchestrator pauses before the job and turns the user's choice into
`keep_classes`; the job applies its params the same way in both modes.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, create_model, field_validator, model_validator

from jobs import plots2d
from jobs.artifacts import Artifact, ClassAverages2D, ParticleSet
from jobs.base import Interaction, JobParams, JobType, Slot
from jobs.class_averages import (
    ClassAverages,
    class_counts,
    particle_classes,
    read_class_averages,
    write_class_averages,
)
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star

ClassNumber = Annotated[int, Field(ge=1)]


class Params(JobParams):
    """Class selection. Class numbers are 1-based rlnClassNumber values of the input."""

    mode: Literal["auto", "interactive"] = Field(
        "auto", description="auto: rules only; interactive: the flow asks and fills keep_classes"
    )
    keep_classes: list[ClassNumber] | None = Field(
        None, description="Keep only these classes (rules still apply); None: all classes"
    )
    drop_classes: list[ClassNumber] | None = Field(None, description="Always reject these classes")
    min_particles: int | None = Field(None, ge=0, description="Minimum particles per kept class")
    max_resolution_A: float | None = Field(
        None, gt=0, description="Reject classes whose estimated resolution (Å) is worse"
    )
    max_mean_class_ess: float | None = Field(
        None, ge=1, description="Reject classes whose members' mean class ESS is larger"
    )
    particle_rule: Literal["argmax", "posterior>=0.5"] = Field(
        "argmax", description="argmax: a kept class's members; posterior>=0.5: also p >= 0.5"
    )

    @field_validator("keep_classes", "drop_classes")
    @classmethod
    def _canonical(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else sorted(set(v))

    @model_validator(mode="after")
    def _disjoint(self) -> Params:
        both = set(self.keep_classes or ()) & set(self.drop_classes or ())
        if both:
            raise ValueError(f"classes {sorted(both)} are in both keep_classes and drop_classes")
        return self


def _float_column(tables: ParticleTables, col: str, why: str) -> np.ndarray:
    if col not in tables.particles:
        raise JobInputError(f"{tables.source}: {why} needs the particle column {col}")
    return pd.to_numeric(tables.particles[col], errors="coerce").to_numpy(dtype=np.float64)


def _rule_failures(
    params: Params, averages: ClassAverages, tables: ParticleTables, cls: np.ndarray,
    counts: np.ndarray,
) -> list[list[str]]:
    """Per class (table order), the reasons it is rejected (empty list: kept)."""
    numbers = averages.numbers
    reasons: list[list[str]] = [[] for _ in numbers]
    for field in ("keep_classes", "drop_classes"):
        unknown = sorted(set(getattr(params, field) or ()) - set(numbers.tolist()))
        if unknown:
            raise JobInputError(
                f"{field}: classes {unknown} are not in {averages.source} "
                f"(classes {numbers.min()}..{numbers.max()})"
            )
    keep = set(params.keep_classes) if params.keep_classes is not None else None
    drop = set(params.drop_classes or ())
    res = ess = None
    if params.max_resolution_A is not None:
        if "rlnEstimatedResolution" not in averages.table:
            raise JobInputError(f"max_resolution_A: {averages.source} has no rlnEstimatedResolution")
        res = pd.to_numeric(averages.table["rlnEstimatedResolution"], errors="coerce").to_numpy(float)
    if params.max_mean_class_ess is not None:
        member_ess = _float_column(tables, "cdagClassESS", "max_mean_class_ess")
        ess = pd.Series(member_ess).groupby(cls).mean().reindex(numbers).to_numpy(np.float64)
    for j, k in enumerate(numbers):
        if keep is not None and k not in keep:
            reasons[j].append("not in keep_classes")
        if k in drop:
            reasons[j].append("in drop_classes")
        if params.min_particles is not None and counts[j] < params.min_particles:
            reasons[j].append(f"{counts[j]} particles < {params.min_particles}")
        if res is not None and not res[j] <= params.max_resolution_A:
            reasons[j].append(f"resolution {res[j]:.2f} Å > {params.max_resolution_A:g} Å")
        if ess is not None and not ess[j] <= params.max_mean_class_ess:
            reasons[j].append(f"mean class ESS {ess[j]:.3f} > {params.max_mean_class_ess:g}")
    return reasons


def _load(
    inputs: Mapping[str, Artifact], project_dir: Path
) -> tuple[ClassAverages, ParticleTables, np.ndarray, np.ndarray]:
    """Class averages, particle tables, each particle's class and the class counts."""
    averages = read_class_averages(inputs["class_averages"], project_dir)
    tables = read_tables(inputs["particles"], project_dir)
    cls = particle_classes(tables, averages.numbers)
    return averages, tables, cls, class_counts(cls, averages.numbers)


def _needs_input(params: Params) -> bool:
    return params.mode == "interactive" and params.keep_classes is None


def _selection_form(
    params: Params, inputs: Mapping[str, Artifact], project_dir: Path
) -> tuple[type[BaseModel], str]:
    """The interactive form: keep_classes, proposed by the rules, and the montage to choose from."""
    averages, tables, cls, counts = _load(inputs, project_dir)
    numbers = averages.numbers
    reasons = _rule_failures(params, averages, tables, cls, counts)
    proposed = [int(k) for k, r in zip(numbers, reasons, strict=True) if not r]
    res = averages.table.get("rlnEstimatedResolution")
    fig = plots2d.class_montage(
        averages.images, numbers, counts, None if res is None else res.to_numpy(float),
        selected=[not r for r in reasons], title="Proposed by the rules (green)",
    )
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80, bbox_inches="tight")
    uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    res_text = [""] * len(numbers) if res is None else [f"{float(r):.1f}" for r in res]
    rows = "\n".join(
        f"| {k} | {c} | {res_text[j]} | {'; '.join(reasons[j]) or 'kept'} |"
        for j, (k, c) in enumerate(zip(numbers, counts, strict=True))
    )
    description = (
        f"### Select 2D classes\n\nEnter the class numbers to keep (1-based). The rules propose "
        f"{proposed}.\n\n![classes]({uri})\n\n| class | particles | resolution (Å) | rules |\n"
        f"|---|---|---|---|\n{rows}"
    )
    model = create_model(
        "Select2DChoice",
        keep_classes=(list[ClassNumber], Field(proposed, description="Class numbers to keep")),
    )
    return model, description


def run(params: Params, inputs: dict, ctx: JobContext) -> dict:
    if _needs_input(params):
        raise JobInputError("mode interactive: keep_classes was never chosen (run through `flow run`)")
    particles: ParticleSet = inputs["particles"]
    averages, tables, cls, counts = _load(inputs, ctx.project_dir)
    numbers = averages.numbers

    reasons = _rule_failures(params, averages, tables, cls, counts)
    kept = np.array([not r for r in reasons])
    for k, r in zip(numbers, reasons, strict=True):
        if r:
            ctx.log.info(f"class {k} rejected: {'; '.join(r)}")
    if not kept.any():
        raise JobInputError("the selection rejects every class; relax the rules or keep_classes")

    mask = np.isin(cls, numbers[kept])
    if params.particle_rule == "posterior>=0.5":
        mask &= _float_column(tables, "rlnMaxValueProbDistribution", "particle_rule") >= 0.5
    p = tables.particles
    out = {
        "particles": write_particle_star(
            ctx, "particles", ParticleTables(tables.optics, p[mask].reset_index(drop=True),
                                             tables.source), particles),
        "rejected": write_particle_star(
            ctx, "rejected", ParticleTables(tables.optics, p[~mask].reset_index(drop=True),
                                            tables.source), particles),
    }
    table = averages.table[kept].reset_index(drop=True)
    table["cdagOriginalClassNumber"] = table["rlnClassNumber"]
    out["class_averages"] = write_class_averages(
        ctx, "class_averages", table, averages.images[kept], inputs["class_averages"].pixel_size
    )

    ctx.log.info(f"selected {int(mask.sum())} of {len(mask)} particles in {int(kept.sum())} "
                 f"of {len(kept)} classes")
    ctx.metric("selected_particles", int(mask.sum()))
    ctx.metric("rejected_particles", int((~mask).sum()))
    ctx.metric("selected_classes", numbers[kept].tolist())
    ctx.metric("rejected_classes", numbers[~kept].tolist())
    res = averages.table.get("rlnEstimatedResolution")
    ctx.plot("selection", plots2d.class_montage(
        averages.images, numbers, counts, None if res is None else res.to_numpy(float),
        selected=kept.tolist(), title=f"Selected (green) {int(kept.sum())} of {len(kept)} classes",
    ), caption=f"{int(mask.sum())} of {len(mask)} particles selected")
    ctx.plot("selection_sizes", plots2d.class_sizes(numbers, counts, selected=kept.tolist()))
    return out


JOB = JobType(
    name="select_2d",
    params=Params,
    inputs={
        "particles": Slot(ParticleSet, requires=frozenset({"class"}),
                          help="2D-classified particles (rlnClassNumber)"),
        "class_averages": Slot(ClassAverages2D, help="The class averages of the same job"),
    },
    outputs={"particles": ParticleSet, "rejected": ParticleSet, "class_averages": ClassAverages2D},
    version=1,
    run=run,
    summary="Select 2D classes by lists and rules (size, resolution, class ESS)",
    passes={"particles": "particles", "rejected": "particles"},
    interaction=Interaction(needs_input=_needs_input, form=_selection_form),
)
