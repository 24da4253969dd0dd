"""class_2d: cryoSPARC-style 2D classification (online EM, sigma annealing, capacity cap).

algorithms.md §3; engine in kernels/classify2d.py. Particles are Fourier-cropped to a working
box whose Nyquist just exceeds `max_res_A` (band r_max = floor(D a / max_res_A) shells), so
the class averages come out at that box and pixel size. O-EM batches (K x
`batch_size_per_class` random particles, per-epoch permutations from the seed) are read by
index from the stacks; full iterations stream the set in STAR order (`WorkingSet.stream`). Only
one batch and the model are in memory (plus per-particle scalars: the scale alpha and the
outputs), and the working-box transforms when they fit the pre-read budget (jobs/working_set.py).

Shift search: integer shifts within a disc of radius `offset_range_A` (default min(20 px,
0.15 D) at the working box; at least 1 px), Gaussian prior of half that width, sub-pixel by
parabolic fit; in-plane step 1/r_max rad (2x coarser in the first 5 O-EM iterations).
`sigma_anneal=False` keeps c_t = 1 throughout (no initial classification uncertainty).
`max_particles_per_class`: see kernels.classify2d.capacity_assign.

Outputs: `particles` (same stacks, new columns: rlnClassNumber 1 = largest, rlnAnglePsi,
rlnOriginXAngst/YAngst = -t * pixel size, rlnMaxValueProbDistribution,
rlnLogLikeliContribution, cdagClassESS, cdagPoseESS with marginalisation) and
`class_averages` (sorted by size). Checkpoints every `checkpoint_every` O-EM iterations in
ctx.checkpoint_dir; a rerun of the same job resumes from the last one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from jobs import plots2d
from jobs.artifacts import ClassAverages2D, ParticleSet
from jobs.base import JobParams, JobType, Slot
from jobs.class_averages import write_class_averages
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from jobs.working_set import WorkingSet, working_geometry
from kernels import classify2d as c2
from kernels.backend import get_xp, to_host

STATE_FILE = "state.npz"


class Params(JobParams):
    """2D classification; names follow cryoSPARC's 2D classification job."""

    num_classes: int = Field(50, ge=1, description="Number of 2D classes")
    max_res_A: float = Field(6.0, gt=0, description="Maximum resolution (Å); sets the working box")
    initial_uncertainty_factor: float = Field(
        2.0, ge=1, description="Initial classification uncertainty factor (ICUF, noise scale c_0)"
    )
    num_oem_iterations: int = Field(20, ge=0, description="Number of online-EM iterations")
    batch_size_per_class: int = Field(100, ge=1, description="O-EM batch size per class")
    num_final_full_iterations: int = Field(1, ge=1, description="Full EM passes at the end")
    sigma_anneal: bool = Field(True, description="Anneal the noise scale from ICUF to 1 (off: 1)")
    sigma_anneal_start_iter: int = Field(2, ge=0, description="Iteration to start annealing sigma")
    sigma_anneal_iters: int = Field(15, ge=0, description="Number of iterations to anneal sigma")
    force_max_over_poses: bool = Field(
        True, description="Max over poses/shifts (true) or marginalise over them (false)"
    )
    circular_mask_diameter_A: float | None = Field(
        None, gt=0, description="Class window diameter (Å); None: whole box (corners only)"
    )
    recenter: bool = Field(True, description="Re-centre classes (centre of mass above 0.2 max)")
    clamp_solvent: bool = Field(False, description="Clamp class averages to non-negative values")
    per_particle_scale: bool = Field(False, description="Fit a per-particle amplitude scale")
    max_particles_per_class: int | None = Field(
        None, ge=1, description="Capacity of each class (particles); None: no cap"
    )
    offset_range_A: float | None = Field(
        None, gt=0, description="Shift search radius (Å, RELION --offset_range); None: 15% of the box"
    )
    checkpoint_every: int = Field(5, ge=1, description="O-EM iterations between checkpoints")
    chunk_size: int = Field(2000, ge=1, description="Particles per streamed chunk in full passes")


def _metrics(ctx: JobContext, clf: c2.Classifier2D, out: c2.Assignment, it: int, n: int) -> None:
    sizes = np.sort(to_host(clf.pi) * n)[::-1]
    ctx.metric("class_sizes", [round(float(s), 1) for s in sizes], it)
    ctx.metric("mean_class_ess", float(out.class_ess.mean()), it)
    ctx.metric("log_likelihood", float(out.loglik.mean()), it)
    res = [float(r) if np.isfinite(r) else -1.0 for r in clf.resolution]
    ctx.metric("resolution_A", res, it)


def _save(ctx: JobContext, clf: c2.Classifier2D, em: c2.OnlineEM, done: int) -> None:
    path = ctx.checkpoint_dir / STATE_FILE
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **clf.state(), alpha=em.alpha, done=np.asarray(done))
    tmp.replace(path)


def _resume(ctx: JobContext, clf: c2.Classifier2D, em: c2.OnlineEM) -> int:
    path = ctx.checkpoint_dir / STATE_FILE
    if not path.is_file():
        return -1
    with np.load(path) as d:
        state = {k: d[k] for k in d.files}
    clf.load_state(state)
    em.alpha = state["alpha"]
    ctx.log.info(f"resuming after O-EM iteration {int(state['done'])} from {path.name}")
    return int(state["done"])


def _particles_out(ctx: JobContext, tables: ParticleTables, ps: ParticleSet,
                   out: c2.Assignment, rank: np.ndarray, params: Params,
                   pixel_size: float) -> ParticleSet:
    p = tables.particles.copy()
    p["rlnClassNumber"] = rank[out.cls] + 1
    p["rlnAnglePsi"] = (out.psi + 180.0) % 360.0 - 180.0
    p["rlnOriginXAngst"] = -out.shift[:, 0] * pixel_size
    p["rlnOriginYAngst"] = -out.shift[:, 1] * pixel_size
    p["rlnMaxValueProbDistribution"] = out.max_prob
    p["rlnLogLikeliContribution"] = out.loglik
    p["cdagClassESS"] = out.class_ess
    if not params.force_max_over_poses:
        p["cdagPoseESS"] = out.pose_ess
    if params.per_particle_scale:
        p["cdagScale"] = out.alpha
    new = ParticleTables(optics=tables.optics, particles=p, source=tables.source)
    return write_particle_star(ctx, "particles", new, ps)


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    tables = read_tables(ps, ctx.project_dir)
    N, K = len(tables), params.num_classes
    if N < 2 * K:
        raise JobInputError(f"{N} particles are too few for {K} classes (need >= {2 * K})")
    cap = params.max_particles_per_class
    if cap is not None and cap * K < N:
        raise JobInputError(f"max_particles_per_class {cap} x {K} classes < {N} particles")
    D, a, r_max = working_geometry(ps.box, ps.pixel_size, params.max_res_A)
    shift_radius = min(20.0, 0.15 * D) if params.offset_range_A is None else max(params.offset_range_A / a, 1.0)
    window = None if params.circular_mask_diameter_A is None else params.circular_mask_diameter_A / (2 * a)
    settings = c2.Settings(
        n_classes=K, D=D, pixel_size=a, r_max=r_max, psi_step_deg=math.degrees(1.0 / r_max),
        shift_radius_px=shift_radius, window_radius_px=window,
        force_max=params.force_max_over_poses, recenter=params.recenter,
        clamp_solvent=params.clamp_solvent, per_particle_scale=params.per_particle_scale,
    )
    schedule = c2.Schedule(
        num_oem_iterations=params.num_oem_iterations, batch_size=K * params.batch_size_per_class,
        num_full_iterations=params.num_final_full_iterations,
        icuf=params.initial_uncertainty_factor, anneal=params.sigma_anneal,
        anneal_start=params.sigma_anneal_start_iter, anneal_iters=params.sigma_anneal_iters,
        max_per_class=cap,
    )
    xp = get_xp()
    clf = c2.Classifier2D(settings, xp)
    em = c2.OnlineEM(clf, schedule, N, params.seed)
    src = WorkingSet(ps, tables, ctx, D, a, xp)
    ctx.log.info(f"{N} particles, box {ps.box} -> {D} px ({a:.3g} Å/px), band {r_max} shells, "
                 f"{K} classes, backend {ctx.backend}")
    total = params.num_oem_iterations + params.num_final_full_iterations
    done = _resume(ctx, clf, em)
    if done < 0:
        em.seed_classes(lambda idx: src.load(idx, clf.band))
    for t in range(done + 1, params.num_oem_iterations):
        ctx.check_cancelled()
        _, out = em.oem_iteration(t, lambda idx: src.load(idx, clf.band))
        _metrics(ctx, clf, out, t, N)
        ctx.progress("iterations", t + 1, total)
        if (t + 1) % params.checkpoint_every == 0 or t + 1 == params.num_oem_iterations:
            _save(ctx, clf, em, t)
    for f in range(params.num_final_full_iterations):
        out = em.full_iteration(src.stream(params.chunk_size, clf.band))
        _metrics(ctx, clf, out, params.num_oem_iterations + f, N)
        ctx.progress("iterations", params.num_oem_iterations + f + 1, total)

    sizes = np.bincount(out.cls, minlength=K)
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty(K, dtype=np.int64)
    rank[order] = np.arange(K)
    particles = _particles_out(ctx, tables, ps, out, rank, params, a)
    ess = np.array([out.class_ess[out.cls == k].mean() if sizes[k] else np.nan for k in range(K)])
    pi = to_host(clf.pi)
    table = pd.DataFrame({
        "rlnClassNumber": np.arange(1, K + 1),
        "rlnClassDistribution": pi[order],
        "cdagClassSize": sizes[order],
        "rlnEstimatedResolution": clf.resolution[order],
        "cdagMeanClassESS": ess[order],
    })
    images = to_host(clf.refs)[order]
    averages: ClassAverages2D = write_class_averages(ctx, "class_averages", table, images, a)
    res = clf.resolution[order]
    ctx.plot("class_montage", plots2d.class_montage(images, np.arange(1, K + 1), sizes[order], res),
             caption=f"{K} class averages, largest first (count, FRC 0.143 resolution)")
    ctx.plot("class_sizes", plots2d.class_sizes(np.arange(1, K + 1), sizes[order]),
             caption="Particles per class")
    ctx.metric("particles", N)
    return {"particles": particles, "class_averages": averages}


JOB = JobType(
    name="class_2d",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"ctf"}), help="Particles with CTF")},
    outputs={"particles": ParticleSet, "class_averages": ClassAverages2D},
    version=1,
    run=run,
    summary="2D classification: online EM with in-plane/shift search, CTF, noise annealing, cap",
    adds={"particles": frozenset({"class", "alignments2D"})},
    passes={"particles": "particles"},
    gpu=True,
)
