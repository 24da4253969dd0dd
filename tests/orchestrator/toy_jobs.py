"""Small job types for orchestrator tests (registered through CRYODAG_JOB_MODULES)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, create_model

from jobs.artifacts import Mask, ParticleSet
from jobs.base import Interaction, JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError


class MakeParams(JobParams):
    value: float = 1.0
    count: int = Field(3, ge=1, le=1000)
    sleep_s: float = 0.0
    fail: bool = False
    bad_input: bool = False
    nondeterministic: bool = False


def _write(ctx: JobContext, text: str, count: int) -> ParticleSet:
    star = ctx.path("particles.star")
    star.write_text(text)
    return ParticleSet(star=ctx.ref(star), stacks=[], count=count, box=8, pixel_size=1.0,
                       provides=frozenset({"ctf"}), summary={"value": text})


def run_make(params: MakeParams, inputs: dict, ctx: JobContext) -> dict:
    (ctx.work_dir / "child.pid").write_text(str(os.getpid()))
    sleep_s = params.sleep_s + float(os.environ.get("TOY_EXTRA_SLEEP_S", "0"))
    steps = max(1, int(sleep_s / 0.05))
    for i in range(steps):
        if sleep_s:
            time.sleep(0.05)
        ctx.progress("iterations", i + 1, steps)
    if params.fail:
        raise RuntimeError("toy failure")
    if params.bad_input:
        raise JobInputError("file 'x.star', row 3: missing rlnDefocusU")
    ctx.metric("value", params.value, iteration=0)
    ctx.log.info("made %s", params.value)
    text = f"{params.value}\n" + (f"{time.time_ns()}\n" if params.nondeterministic else "")
    return {"particles": _write(ctx, text, params.count)}


class AddParams(JobParams):
    add: float = 1.0


def run_add(params: AddParams, inputs: dict, ctx: JobContext) -> dict:
    src = inputs["particles"]
    value = float(ctx.resolve(src.star).read_text().split()[0]) + params.add
    ctx.metric("value", value)
    return {"particles": _write(ctx, f"{value}\n", src.count)}


def run_mask(params: JobParams, inputs: dict, ctx: JobContext) -> dict:
    p = ctx.path("mask.mrc")
    p.write_bytes(b"mask")
    return {"mask": Mask(map=ctx.ref(p), box=8, pixel_size=1.0)}


class PickParams(JobParams):
    mode: Literal["auto", "interactive"] = "interactive"
    keep: list[int] | None = None


def _pick_form(params: PickParams, inputs: dict, project_dir: Path) -> tuple[type[BaseModel], str]:
    value = float((project_dir / inputs["particles"].star).read_text().split()[0])
    model = create_model("PickChoice", keep=(list[int], Field([1, 2], description="numbers to keep")))
    return model, f"### Pick numbers\n\nupstream value {value}"


def run_pick(params: PickParams, inputs: dict, ctx: JobContext) -> dict:
    return {"particles": _write(ctx, f"{sum(params.keep or [])}\n", inputs["particles"].count)}


MAKE = JobType("toy_make", MakeParams, {}, {"particles": ParticleSet}, 1, run_make,
               summary="toy source", adds={"particles": frozenset({"ctf"})})
ADD = JobType("toy_add", AddParams, {"particles": Slot(ParticleSet, frozenset({"ctf"}))},
              {"particles": ParticleSet}, 1, run_add, summary="toy add", passes={"particles": "particles"})
MASK = JobType("toy_mask", JobParams, {"particles": Slot(ParticleSet)}, {"mask": Mask}, 1, run_mask)
NEEDS_POSES = JobType("toy_needs_poses", AddParams,
                      {"particles": Slot(ParticleSet, frozenset({"alignments3D"}))},
                      {"particles": ParticleSet}, 1, run_add)

PICK = JobType("toy_pick", PickParams, {"particles": Slot(ParticleSet)}, {"particles": ParticleSet}, 1,
               run_pick, passes={"particles": "particles"}, interaction=Interaction(
                   needs_input=lambda p: p.mode == "interactive" and p.keep is None, form=_pick_form))

class GpuParams(JobParams):
    sleep_s: float = 1.0


def run_gpu(params: GpuParams, inputs: dict, ctx: JobContext) -> dict:
    start = time.time()
    time.sleep(params.sleep_s)
    text = f"{os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {start} {time.time()}\n"
    return {"particles": _write(ctx, text, 1)}


GPU = JobType("toy_gpu", GpuParams, {}, {"particles": ParticleSet}, 1, run_gpu, gpu=True)

MODULES = ",".join(
    f"{name}=toy_jobs:{attr}"
    for name, attr in [("toy_make", "MAKE"), ("toy_add", "ADD"), ("toy_mask", "MASK"),
                       ("toy_needs_poses", "NEEDS_POSES"), ("toy_pick", "PICK"), ("toy_gpu", "GPU")]
)
