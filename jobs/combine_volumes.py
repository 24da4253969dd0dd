"""combine_volumes: one VolumeSet from the maps of up to four VolumeSets (e.g. the ab-initio
1-, 3- and 6-class maps as the references of one heterogeneous refinement).

Slots `volumes` (required), `volumes_2`, `volumes_3`, `volumes_4` (optional); params `use`,
`use_2`, `use_3`, `use_4` pick the 1-based maps of each slot (None: all), in the order given.
Output `volumes`: the chosen maps slot by slot, resampled (Fourier crop or pad) to the first
set's box and pixel size (the physical boxes must agree); full maps only: half maps, masks and
FSC tables are not carried over.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from jobs.artifacts import VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.select_2d import ClassNumber
from jobs.volumes import MapOut, read_maps, resample, write_volume_set

SLOTS = ("volumes", "volumes_2", "volumes_3", "volumes_4")
USE = {"volumes": "use", "volumes_2": "use_2", "volumes_3": "use_3", "volumes_4": "use_4"}


def _use_field(slot: str) -> Any:
    return Field(None, min_length=1, description=f"Maps of `{slot}` to take (1-based, in order); None: all")


class Params(JobParams):
    """Which maps of each input set to take."""

    use: list[ClassNumber] | None = _use_field("volumes")
    use_2: list[ClassNumber] | None = _use_field("volumes_2")
    use_3: list[ClassNumber] | None = _use_field("volumes_3")
    use_4: list[ClassNumber] | None = _use_field("volumes_4")

    @field_validator("use", "use_2", "use_3", "use_4")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"{v} repeats a map")
        return v


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    first: VolumeSet = inputs["volumes"]
    D, a = first.box, first.pixel_size
    maps, sources = [], []
    for slot in SLOTS:
        use = getattr(params, USE[slot])
        vs: VolumeSet | None = inputs.get(slot)
        if vs is None:
            if use is not None:
                raise JobInputError(f"{USE[slot]} {use}: input '{slot}' is not wired")
            continue
        pick = use or list(range(1, len(vs.volumes) + 1))
        bad = [k for k in pick if k > len(vs.volumes)]
        if bad:
            raise JobInputError(f"{USE[slot]} {bad}: input '{slot}' has {len(vs.volumes)} maps")
        data = read_maps(vs, ctx.project_dir)
        for k in pick:
            maps.append(MapOut(resample(data[k - 1], vs.pixel_size, D, a, f"{slot} map {k}")))
            sources.append(f"{slot}:{k}")
    out = write_volume_set(ctx, "volume", maps, a)
    out = out.model_copy(update={"summary": {"maps": len(maps), "box": D, "pixel_size_A": a}})
    ctx.log.info(f"{len(maps)} maps at box {D}, {a:.4g} Å/px: " + ", ".join(sources))
    ctx.metric("maps", len(maps))
    return {"volumes": out}


JOB = JobType(
    name="combine_volumes",
    params=Params,
    inputs={slot: Slot(VolumeSet, optional=slot != "volumes",
                       help="Maps (box and pixel size of the output)" if slot == "volumes" else "More maps")
            for slot in SLOTS},
    outputs={"volumes": VolumeSet},
    version=1,
    run=run,
    summary="Combine the chosen maps of up to four volume sets into one (resampled to the first set's box)",
)
