"""ab_initio: K maps from scratch by SGD with resolution annealing (algorithms.md §5).

Engine: kernels/abinitio.py. Particles are Fourier-cropped to the working box whose band ends
at `max_res_A`; the schedule runs `num_init_iters` at `init_res_A`, raises the Fourier radius
by `radius_step` shells per iteration up to `max_res_A`, then `num_final_iters` more.
`num_particles` draws a random subset (seeded) for large datasets; only the subset is used
and output. `num_starts` > 1 runs the initial iterations from that many random starts and
continues from the one of highest log evidence on a separate batch, or, with `start_choice`
final, runs the whole schedule from each start and keeps the one of highest log evidence at the
full band (kernels/abinitio.py); the checkpoint holds the finished starts.
After the last iteration every used particle gets one E-step (class, 3D pose).

The hand: ab-initio cannot tell a map from its mirror image, and each class is initialised
independently, so each output map has an arbitrary hand (as in cryoSPARC and RELION). The job
says so in its log; tests compare against both hands (kernels/volume_align.py), and a
refinement or a known feature (helix handedness, a fitted model) decides it.

Outputs: `volumes` (K maps at the particles' box and pixel size: the working-box maps
upsampled by zero-padding their Fourier transform) and `particles` (the used subset with
rlnClassNumber, rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, rlnMaxValueProbDistribution,
cdagClassESS). Checkpoints every `checkpoint_every` iterations; a rerun resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from jobs import plots3d
from jobs.artifacts import ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, PointGroup, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from jobs.volumes import MapOut, write_volume_set
from jobs.working_set import WorkingSet, working_geometry
from kernels import abinitio as ab
from kernels.backend import get_xp, to_host
from kernels.fourier import Band, fourier_pad
from kernels.refine3d import EStep3D
from kernels.rotations import matrix_to_euler

STATE_FILE = "state.npz"


class Params(JobParams):
    """Ab-initio reconstruction; names follow cryoSPARC's job where it has them."""

    num_classes: int = Field(1, ge=1, description="Number of ab-initio classes")
    num_particles: int | None = Field(None, ge=2, description="Use a random subset of this many particles")
    max_res_A: float = Field(12.0, gt=0, description="Maximum resolution (Å)")
    init_res_A: float = Field(35.0, gt=0, description="Initial resolution (Å)")
    num_init_iters: int = Field(30, ge=0, description="Iterations at the initial resolution")
    num_final_iters: int = Field(30, ge=1, description="Iterations at the maximum resolution")
    radius_step: float = Field(0.25, gt=0, description="Fourier radius step per iteration (shells)")
    batch_size: int = Field(200, ge=2, description="Minibatch size (particles)")
    learning_rate: float = Field(0.4, gt=0, le=1, description="Initial learning rate")
    learning_rate_final: float = Field(0.15, gt=0, le=1, description="Learning rate after the high-rate phase")
    high_lr_iters: int = Field(30, ge=0, description="Iterations at the initial learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    num_starts: int = Field(1, ge=1, le=20, description="Random starts; the run keeps the one of highest log evidence")
    start_choice: Literal["initial", "final"] = Field(
        "initial", description="Compare the starts after the initial iterations (continuing from the best) or "
                               "after the whole schedule (num_starts full runs)")
    class_similarity: float = Field(0.1, ge=0, le=1, description="Class similarity (annealed to 0)")
    class_similarity_end: int = Field(40, ge=0, description="Iteration where class similarity reaches 0")
    initial_sigma_scale: float = Field(2.0, ge=1, description="Initial noise scale (annealed to 1)")
    enforce_nonneg: bool = Field(True, description="Enforce non-negativity")
    center_structures: bool = Field(True, description="Centre structures in real space")
    mask_diameter_A: float | None = Field(None, gt=0, description="Spherical window diameter (Å); None: 85% of the box")
    offset_range_A: float | None = Field(None, gt=0, description="Shift search radius (Å); None: 10% of the box")
    symmetry: PointGroup = Field("C1", description="Point group (Cn or Dn)")
    checkpoint_every: int = Field(10, ge=1, description="Iterations between checkpoints")
    chunk_size: int = Field(1000, ge=1, description="Particles per chunk of the final assignment")


def _subset(n: int, params: Params) -> np.ndarray:
    if params.num_particles is None or params.num_particles >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([params.seed, 7]).choice(n, params.num_particles, replace=False))


@dataclass
class _Progress:
    """Where a run stands: the last iteration done of start ``start`` (-1: not begun), that
    start's class fractions per iteration (iterations, K), and the final states of the starts
    before it (``start_choice`` final; each with its "fractions")."""

    done: int
    start: int
    fractions: np.ndarray
    finals: list[dict[str, np.ndarray]]


def _resume(ctx: JobContext, eng: ab.AbInitio, total: int) -> _Progress:
    path = ctx.checkpoint_dir / STATE_FILE
    if not path.is_file():
        return _Progress(-1, 0, np.zeros((total, eng.s.n_classes)), [])
    with np.load(path) as d:
        state = {k: d[k] for k in d.files}
    eng.load_state(state)
    start = int(state.get("start", 0))
    finals = [{k.split("_", 1)[1]: v for k, v in state.items() if k.startswith(f"final{j}_")} for j in range(start)]
    ctx.log.info(f"resuming start {start + 1} after iteration {int(state['done'])} from {path.name}")
    return _Progress(int(state["done"]), start, state["fractions"], finals)


def _save(ctx: JobContext, eng: ab.AbInitio, at: _Progress) -> None:
    path = ctx.checkpoint_dir / STATE_FILE
    tmp = path.with_suffix(".tmp.npz")
    finals = {f"final{j}_{k}": v for j, f in enumerate(at.finals) for k, v in f.items()}
    np.savez(tmp, **eng.state(), **finals, done=np.asarray(at.done), start=np.asarray(at.start),
             fractions=at.fractions)
    tmp.replace(path)


def _best_start(ctx: JobContext, eng: ab.AbInitio, load: ab.Loader, fractions: np.ndarray) -> int:
    """The initial phase from ``num_starts`` starts (``AbInitio.best_start``), logged; fills the
    chosen start's class fractions and returns the last iteration done."""

    def started(m: int, score: float) -> None:
        ctx.check_cancelled()
        ctx.log.info(f"start {m + 1}: mean log evidence {score:.3f} after {eng.s.n_init_iters} iterations")
        ctx.metric("start_log_evidence", score, m)
        ctx.progress("starts", m + 1, eng.s.n_starts)

    done, start_metrics = eng.best_start(load, started)
    for t, m in enumerate(start_metrics):
        fractions[t] = m["class_fractions"]
        _metrics(ctx, m, t)
    ctx.log.info("continuing from the start of highest log evidence")
    return done


def _metrics(ctx: JobContext, m: dict[str, Any], t: int) -> None:
    for name in ("resolution_A", "class_fractions", "mean_class_ess", "temperature"):
        ctx.metric(name, m[name], t)


def _assign(eng: ab.AbInitio, src: WorkingSet, used: np.ndarray, chunk: int,
            ctx: JobContext) -> list[tuple[np.ndarray, EStep3D]]:
    """Final E-step of the used particles at the maximum resolution, chunk by chunk."""
    band = Band(eng.s.D, int(eng.s.r_max))
    out = []
    for i in range(0, used.size, chunk):
        ctx.check_cancelled()
        idx = used[i : i + chunk]
        X, C = src.load(idx, band)
        out.append((np.arange(i, i + idx.size), eng.assign(X, C, band)))
        ctx.progress("final assignment", i + idx.size, used.size)
    return out


def _particles_out(ctx: JobContext, tables: ParticleTables, ps: ParticleSet, used: np.ndarray,
                   parts: list[tuple[np.ndarray, EStep3D]], pixel_size: float) -> ParticleSet:
    p = np.concatenate([e.p for _, e in parts])
    cls = p.argmax(axis=1)
    b = np.arange(cls.size)
    R = np.concatenate([to_host(e.result.R) for _, e in parts])[b, cls]
    t = np.concatenate([to_host(e.result.shifts) for _, e in parts])[b, cls]
    rot, tilt, psi = matrix_to_euler(R)
    df = tables.particles.iloc[used].reset_index(drop=True).copy()
    df["rlnClassNumber"] = cls + 1
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = rot, tilt, psi
    df["rlnOriginXAngst"], df["rlnOriginYAngst"] = -t[:, 0] * pixel_size, -t[:, 1] * pixel_size
    df["rlnMaxValueProbDistribution"] = p[b, cls]
    df["cdagClassESS"] = 1.0 / (p * p).sum(axis=1)
    new = ParticleTables(optics=tables.optics, particles=df, source=tables.source)
    return write_particle_star(ctx, "particles", new, ps)


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    tables = read_tables(ps, ctx.project_dir)
    used = _subset(len(tables), params)
    K = params.num_classes
    if used.size < max(2 * K, params.batch_size // 4):
        raise JobInputError(f"{used.size} particles are too few for {K} classes")
    if params.num_starts > 1 and params.start_choice == "initial" and params.num_init_iters < 1:
        raise JobInputError(f"num_starts {params.num_starts} needs num_init_iters >= 1 (the starts are compared "
                            f"after the initial iterations)")
    if params.init_res_A <= params.max_res_A:
        raise JobInputError(f"init_res_A {params.init_res_A} must be coarser than max_res_A {params.max_res_A}")
    D, a, r_max = working_geometry(ps.box, ps.pixel_size, params.max_res_A)
    r_init = max(2.0, min(float(r_max), ps.box * ps.pixel_size / params.init_res_A))
    shift = max(2.0, 0.1 * D) if params.offset_range_A is None else max(1.0, params.offset_range_A / a)
    settings = ab.Settings(
        n_classes=K, D=D, pixel_size=a, r_init=r_init, r_max=float(r_max),
        n_init_iters=params.num_init_iters, radius_step=params.radius_step,
        n_final_iters=params.num_final_iters, batch_size=min(params.batch_size, used.size),
        learning_rate=params.learning_rate, learning_rate_final=params.learning_rate_final,
        high_lr_iters=params.high_lr_iters, momentum=params.momentum,
        class_similarity=params.class_similarity if K > 1 else 0.0,
        similarity_end=params.class_similarity_end, sigma_scale=params.initial_sigma_scale,
        nonneg=params.enforce_nonneg, recentre=params.center_structures,
        window_radius_px=None if params.mask_diameter_A is None else params.mask_diameter_A / (2 * a),
        shift_extent_px=shift, symmetry=params.symmetry, n_starts=params.num_starts,
        start_choice=params.start_choice,
    )
    xp = get_xp()
    eng = ab.AbInitio(settings, xp, used.size, params.seed)
    src = WorkingSet(ps, tables, ctx, D, a, xp)

    def load(idx: np.ndarray, band: Band) -> tuple[Any, Any]:
        return src.load(used[idx], band)

    total = settings.n_iterations
    ctx.log.info(f"{used.size} particles, box {ps.box} -> {D} px ({a:.3g} Å/px), radius {r_init:.1f} -> "
                 f"{r_max} shells, {K} classes, {total} iterations, backend {ctx.backend}")
    at = _resume(ctx, eng, total)
    runs = settings.n_starts if settings.start_choice == "final" else 1
    for m in range(at.start, runs):
        if at.done < 0:
            eng.initialise(load, m)
            if runs == 1 and settings.n_starts > 1:
                at.done = _best_start(ctx, eng, load, at.fractions)
                _save(ctx, eng, at)
        for t in range(at.done + 1, total):
            ctx.check_cancelled()
            _, _, metrics = eng.iterate(t, load)
            at.fractions[t] = metrics["class_fractions"]
            _metrics(ctx, metrics, m * total + t)
            ctx.progress("iterations", m * total + t + 1, runs * total)
            at.done = t
            if (t + 1) % params.checkpoint_every == 0 and t + 1 < total:
                _save(ctx, eng, at)
        if runs > 1:
            at.finals.append({**eng.state(), "fractions": at.fractions})
            ctx.log.info(f"start {m + 1} of {runs}: {total} iterations done")
            at = _Progress(-1, m + 1, np.zeros_like(at.fractions), at.finals)
        _save(ctx, eng, at)
    fractions = at.fractions
    if runs > 1:
        best, scores = eng.best_final(at.finals, load)
        for m, score in enumerate(scores):
            ctx.log.info(f"start {m + 1}: mean log evidence {score:.3f} after the whole schedule")
            ctx.metric("start_log_evidence", score, m)
        ctx.log.info(f"keeping start {best + 1}, the one of highest log evidence")
        fractions = at.finals[best]["fractions"]
    parts = _assign(eng, src, used, params.chunk_size, ctx)
    particles = _particles_out(ctx, tables, ps, used, parts, a)
    maps = [fourier_pad(to_host(v), ps.box, ndim=3) if ps.box > D else to_host(v) for v in eng.vols]
    volumes = write_volume_set(ctx, "volume", [MapOut(m) for m in maps], ps.pixel_size)
    counts = np.bincount(np.concatenate([e.p.argmax(axis=1) for _, e in parts]), minlength=K)
    ctx.log.info("the hand of each ab-initio map is arbitrary (a mirror image fits the data equally)")
    ctx.plot("maps", plots3d.map_views(maps, [f"class {k + 1}: {counts[k]}" for k in range(K)]),
             caption=f"{K} ab-initio maps: projections and central slices (particles per class)")
    if K > 1:
        ctx.plot("class_fractions", plots3d.class_fractions(fractions), caption="Class fractions per iteration")
    ctx.metric("class_sizes", counts.tolist())
    ctx.metric("particles", int(used.size))
    return {"volumes": volumes, "particles": particles}


JOB = JobType(
    name="ab_initio",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"ctf"}), help="Particles with CTF")},
    outputs={"volumes": VolumeSet, "particles": ParticleSet},
    version=1,
    run=run,
    summary="Ab-initio reconstruction of K classes by SGD with resolution annealing",
    adds={"particles": frozenset({"class", "alignments3D"})},
    passes={"particles": "particles"},
    gpu=True,
)
