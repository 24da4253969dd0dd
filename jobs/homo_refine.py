"""homo_refine: gold-standard homogeneous refinement of all particles against one map (§6;
cryoSPARC "Homogeneous Refinement", RELION 3D auto-refine).

Engine: kernels/homo.py. The reference is map `volume_index` of the `volumes` input, resampled
to the refinement box (`refinement_box_size`; particles are Fourier-cropped to it) and
low-passed to `initial_lowpass_res_A`. Halves: rlnRandomSubset when present (unless
`force_redo_gs_split`), else a seeded random split; they share data below
`gsfsc_split_res_A`. Global coarse-to-fine pose search until the angular step reaches
`local_search_step_deg`, local searches after, except for one more global pass when the band
first reaches Nyquist - 1 (`research_at_full_band`); the band follows the resolution (+
`band_increment_shells`); iterations stop at convergence (RELION's rules) or `max_iters`,
then 1 + `num_final_passes` passes to Nyquist. Mask (`mask_mode`): "dynamic" (made from the
map once the resolution passes `dynamic_mask_start_res_A`), "static" (the `mask` input, which
selects it by default), "none" (a sphere of `particle_diameter_A`).

Outputs: `volumes` (one map: the Wiener-filtered full map, with the unfiltered half maps, the
final mask and an FSC table: rlnFourierShellCorrelation = the phase-randomisation-corrected
masked curve the resolution is read from at 0.143, plus rlnFourierShellCorrelationUnmaskedMaps,
rlnFourierShellCorrelationMaskedMaps, rlnFourierShellCorrelationCorrected), `sharpened` (the
full map sharpened by its Guinier B-factor and low-passed at the resolution), `mask` and
`particles` (all, with rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst = -t x pixel size,
rlnRandomSubset 1/2, rlnMaxValueProbDistribution and cdagScale, the per-particle scale: ones
unless `minimize_over_per_particle_scale`; RELION's rlnGroupScaleCorrection is per group, not
per particle). Maps are at the particles' box (zero-padded in Fourier space when the
refinement box is smaller). Summaries and metrics: resolution (Å) and `bfactor_A2`, the
B-factor applied to sharpen (RELION's sign: negative); per-iteration resolution, band, step,
pose changes. Checkpoints every `checkpoint_every` iterations and after each final pass; a
rerun resumes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import Field

from jobs import plots3d
from jobs.artifacts import Mask, ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, PointGroup, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import random_subsets, read_tables, write_particle_star
from jobs.volumes import MapOut, read_maps, read_mask, resample, write_volume_set
from jobs.working_set import WorkingSet
from kernels import homo
from kernels.backend import get_xp, to_host
from kernels.fourier import Band, fourier_pad
from kernels.rotations import matrix_to_euler

STATE_FILE = "state.npz"
FSC_COLUMNS = {"unmasked": "rlnFourierShellCorrelationUnmaskedMaps",
               "masked": "rlnFourierShellCorrelationMaskedMaps",
               "corrected": "rlnFourierShellCorrelationCorrected"}
ITER_METRICS = ("resolution_A", "band_shells", "step_deg", "local_search", "angle_change_deg",
                "shift_change_px", "mean_pmax", "pose_sd_deg")


class Params(JobParams):
    """Homogeneous refinement; names follow cryoSPARC's job where it has them."""

    volume_index: int = Field(1, ge=1, description="Map of the volumes input to refine (1-based)")
    refinement_box_size: int | None = Field(None, ge=16, description="Refinement box size (voxels); None: particles'")
    initial_lowpass_res_A: float = Field(30.0, gt=0, description="Initial lowpass resolution (Å)")
    gsfsc_split_res_A: float = Field(20.0, gt=0, description="GSFSC split resolution (Å): halves share data below")
    force_redo_gs_split: bool = Field(False, description="Ignore rlnRandomSubset and split the halves anew")
    particle_diameter_A: float | None = Field(None, gt=0, description="Particle diameter (Å); None: 0.8 x box")
    symmetry: PointGroup = Field("C1", description="Point group (Cn or Dn)")
    reestimate_greyscale: bool = Field(True, description="Re-estimate greyscale level of input")
    minimize_over_per_particle_scale: bool = Field(False, description="Minimize over per-particle scale")
    alignment_mode: Literal["maximization", "marginalization"] = Field(
        "maximization", description="Best pose (cryoSPARC) or posterior-weighted poses (RELION) in the M-step")
    initial_sigma_scale: float = Field(3.0, ge=1, description="Noise initial sigma-scale (annealed to 1)")
    sigma_anneal_iters: int = Field(3, ge=0, description="Iterations to anneal the sigma-scale")
    max_iters: int = Field(25, ge=1, description="Maximum iterations before the final passes")
    num_final_passes: int = Field(0, ge=0, description="Number of extra final passes")
    offset_range_A: float | None = Field(None, gt=0, description="Shift search radius (Å); None: 10% of the box")
    band_increment_shells: int | None = Field(
        None, ge=1, description="Shells searched beyond the resolution; None: min(10, max(2, box / 8))")
    local_search_step_deg: float = Field(3.75, gt=0, description="Angular step (deg) where local searches start")
    research_at_full_band: bool = Field(True, description="Search globally once more when the band first "
                                                          "reaches Nyquist - 1 (rescues poses stuck since the start)")
    min_angular_step_deg: float = Field(0.5, gt=0, description="Finest angular step (deg)")
    mask_mode: Literal["dynamic", "static", "none"] | None = Field(
        None, description="Mask: dynamic, static (mask input) or none; None: static with a mask input, else dynamic")
    dynamic_mask_threshold: float = Field(0.2, gt=0, lt=1, description="Dynamic mask threshold (fraction of max)")
    dynamic_mask_near_A: float = Field(6.0, ge=0, description="Dynamic mask near (Å)")
    dynamic_mask_far_A: float = Field(14.0, gt=0, description="Dynamic mask far (Å)")
    dynamic_mask_start_res_A: float = Field(12.0, gt=0, description="Dynamic mask start resolution (Å)")
    checkpoint_every: int = Field(1, ge=1, description="Iterations between checkpoints")
    chunk_size: int = Field(1000, ge=2, description="Particles per streamed chunk")


def _mask_mode(params: Params, has_mask: bool) -> str:
    mode = params.mask_mode or ("static" if has_mask else "dynamic")
    if mode == "static" and not has_mask:
        raise JobInputError("mask_mode 'static' needs a mask input")
    if mode != "static" and has_mask:
        raise JobInputError(f"a mask input is connected but mask_mode is {mode!r}; use 'static' or disconnect it")
    if params.dynamic_mask_far_A <= params.dynamic_mask_near_A:
        raise JobInputError(f"dynamic_mask_far_A {params.dynamic_mask_far_A} must exceed "
                            f"dynamic_mask_near_A {params.dynamic_mask_near_A}")
    return mode


def _settings(params: Params, D: int, a: float, mode: str) -> homo.Settings:
    r_max = D // 2 - 1
    r_init = int(np.clip(round(D * a / params.initial_lowpass_res_A), 2, r_max))
    shift = max(2.0, 0.1 * D) if params.offset_range_A is None else max(1.0, params.offset_range_A / a)
    incr = min(10, max(2, D // 8)) if params.band_increment_shells is None else params.band_increment_shells
    return homo.Settings(
        D=D, pixel_size=a, particle_diameter_A=params.particle_diameter_A or 0.8 * D * a, r_init=r_init,
        r_split=max(1, round(D * a / params.gsfsc_split_res_A)),
        marginalise=params.alignment_mode == "marginalization",
        per_particle_scale=params.minimize_over_per_particle_scale, greyscale=params.reestimate_greyscale,
        sigma_scale=params.initial_sigma_scale, anneal_iters=params.sigma_anneal_iters, shift_extent_px=shift,
        symmetry=params.symmetry, mask_mode=mode, mask_threshold=params.dynamic_mask_threshold,
        mask_near_A=params.dynamic_mask_near_A, mask_far_A=params.dynamic_mask_far_A,
        mask_start_res_A=params.dynamic_mask_start_res_A, incr_shells=incr,
        local_step_deg=params.local_search_step_deg, research_at_full_band=params.research_at_full_band,
        min_step_deg=params.min_angular_step_deg,
        chunk=params.chunk_size)


def _save(ctx: JobContext, eng: homo.HomoRefine, done: int, finals: int) -> None:
    path = ctx.checkpoint_dir / STATE_FILE
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **eng.state(), done=np.asarray(done), finals=np.asarray(finals))
    tmp.replace(path)


def _particles_out(ctx: JobContext, tables: ParticleTables, ps: ParticleSet, eng: homo.HomoRefine,
                   pixel_size: float) -> ParticleSet:
    rot, tilt, psi = matrix_to_euler(eng.R)
    df = tables.particles.copy()
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = rot, tilt, psi
    df["rlnOriginXAngst"] = -eng.shifts[:, 0] * pixel_size
    df["rlnOriginYAngst"] = -eng.shifts[:, 1] * pixel_size
    df["rlnRandomSubset"] = eng.half + 1
    df["rlnMaxValueProbDistribution"] = eng.pmax
    df["cdagScale"] = eng.alpha
    new = ParticleTables(optics=tables.optics, particles=df, source=tables.source)
    return write_particle_star(ctx, "particles", new, ps)


def _scale_histogram(alpha: np.ndarray) -> Figure:
    fig = Figure(figsize=(5.0, 3.0))
    ax = fig.add_subplot()
    ax.hist(alpha, bins=60)
    ax.set_xlabel("per-particle scale")
    ax.set_ylabel("particles")
    fig.tight_layout()
    return fig


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    tables = read_tables(ps, ctx.project_dir)
    N = len(tables)
    if N < 4:
        raise JobInputError(f"{N} particles are too few for two half sets")
    box = ps.box if params.refinement_box_size is None else min(ps.box, params.refinement_box_size)
    D = box - box % 2
    a = ps.box * ps.pixel_size / D
    vs: VolumeSet = inputs["volumes"]
    maps = read_maps(vs, ctx.project_dir)
    if params.volume_index > len(maps):
        raise JobInputError(f"volume_index {params.volume_index}: the volumes input has {len(maps)} maps")
    ref = resample(maps[params.volume_index - 1], vs.pixel_size, D, a, f"volume {params.volume_index}")
    if not np.isfinite(ref).all() or not np.abs(ref).max() > 0:
        raise JobInputError(f"volume {params.volume_index}: the map is empty or not finite")
    mask_in = inputs.get("mask")
    mode = _mask_mode(params, mask_in is not None)
    settings = _settings(params, D, a, mode)
    xp = get_xp()
    try:
        halves = random_subsets(tables, params.force_redo_gs_split, "force_redo_gs_split")
        eng = homo.HomoRefine(settings, xp, N, params.seed, halves, read_mask(mask_in, ctx, D, a))
    except ValueError as exc:
        raise JobInputError(f"homo_refine: {exc}") from exc
    src = WorkingSet(ps, tables, ctx, D, a, xp)

    def load(idx: np.ndarray, band: Band) -> tuple[Any, Any]:
        ctx.check_cancelled()
        ctx.progress("particles", int(idx[-1]) + 1, N)
        return src.load(idx, band)

    ctx.log.info(f"{N} particles, box {ps.box} -> {D} px ({a:.3g} Å/px), band {settings.r_init} -> "
                 f"{settings.r_max} shells, mask {mode}, symmetry {params.symmetry}, backend {ctx.backend}")
    path = ctx.checkpoint_dir / STATE_FILE
    done, finals = -1, 0
    if path.is_file():
        with np.load(path) as d:
            state = {k: d[k] for k in d.files}
        eng.load_state(state)
        done, finals = int(state["done"]), int(state["finals"])
        ctx.log.info(f"resuming after iteration {done} ({finals} final passes) from {path.name}")
    else:
        eng.initialise(ref, load)
        ctx.metric("greyscale", eng.greyscale)
    t = done
    while finals == 0 and not eng.converged and t + 1 < params.max_iters:
        t += 1
        m = eng.iterate(t, load)
        for name in ITER_METRICS:
            ctx.metric(name, m[name], t)
        ctx.log.info(f"iteration {t}: {m['resolution_A']:.2f} Å, band {m['band_shells']} shells, step "
                     f"{m['step_deg']:.3g}° ({'local' if m['local_search'] else 'global'}), angular change "
                     f"{m['angle_change_deg']:.3g}°")
        ctx.progress("iterations", t + 1, params.max_iters)
        if eng.converged or (t + 1) % params.checkpoint_every == 0:
            _save(ctx, eng, t, finals)
    if finals == 0:
        ctx.log.info(f"{'converged' if eng.converged else 'stopped'} after {t + 1} iterations")
    while finals < 1 + params.num_final_passes:
        m = eng.iterate(t + 1 + finals, load, final=True)
        finals += 1
        for name in ITER_METRICS:
            ctx.metric(name, m[name], t + finals)
        _save(ctx, eng, t, finals)
    res = eng.result()
    particles = _particles_out(ctx, tables, ps, eng, a)

    def up(v: Any) -> np.ndarray:
        v = to_host(v)
        return fourier_pad(v, ps.box, ndim=3) if ps.box > D else v

    mask = np.clip(up(res.mask), 0.0, 1.0)
    extra = {FSC_COLUMNS[k]: c for k, c in res.fsc.items()}
    volumes = write_volume_set(ctx, "volume", [MapOut(up(res.full), up(res.half_a), up(res.half_b),
                                                      res.fsc["corrected"], res.resolution_A, extra, mask)],
                               ps.pixel_size)
    sharp = write_volume_set(ctx, "sharpened", [MapOut(up(res.sharpened), resolution_A=res.resolution_A)],
                             ps.pixel_size)
    bfac = None if res.guinier is None else -res.guinier.bfactor
    summary = {"resolution_A": round(res.resolution_A, 3) if math.isfinite(res.resolution_A) else -1.0,
               "bfactor_A2": round(bfac, 1) if bfac is not None else 0.0}
    volumes = volumes.model_copy(update={"summary": summary})
    sharp = sharp.model_copy(update={"summary": summary})
    mask_art = Mask(map=volumes.volumes[0].mask, box=volumes.box, pixel_size=ps.pixel_size)
    ctx.plot("fsc", plots3d.fsc_curves([res.fsc[k] for k in FSC_COLUMNS], list(FSC_COLUMNS), D, a),
             caption=f"Gold-standard FSC: {res.resolution_A:.2f} Å at 0.143 (corrected)")
    ctx.plot("maps", plots3d.map_views([up(res.full), up(res.sharpened), mask], ["full", "sharpened", "mask"]),
             caption="Full, sharpened map and mask: projections and central orthogonal slices")
    if params.minimize_over_per_particle_scale:
        ctx.plot("scales", _scale_histogram(eng.alpha), caption="Per-particle scale")
    ctx.metric("final_resolution_A", res.resolution_A)
    if bfac is not None:
        ctx.metric("bfactor_A2", bfac)
    ctx.log.info(f"final resolution {res.resolution_A:.2f} Å (corrected masked FSC 0.143)"
                 + ("" if bfac is None else f", sharpening B-factor {bfac:.0f} Å²"))
    return {"volumes": volumes, "sharpened": sharp, "mask": mask_art, "particles": particles}


JOB = JobType(
    name="homo_refine",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"ctf"}), help="Particles with CTF"),
            "volumes": Slot(VolumeSet, help="Initial map (e.g. ab-initio)"),
            "mask": Slot(Mask, optional=True, help="Static solvent mask")},
    outputs={"volumes": VolumeSet, "sharpened": VolumeSet, "mask": Mask, "particles": ParticleSet},
    version=2,
    run=run,
    summary="Gold-standard homogeneous refinement with global then local pose search",
    adds={"particles": frozenset({"alignments3D"})},
    passes={"particles": "particles"},
    gpu=True,
)
