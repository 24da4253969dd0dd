"""class_3d: 3D classification without alignment (algorithms.md §8; cryoSPARC "3D
Classification", RELION --skip_align).

Engine: kernels/class3d.py. The particles keep their consensus poses (rlnAngleRot/Tilt/Psi,
rlnOriginX/YAngst = -t x pixel size); they are Fourier-cropped to the working box whose band
ends at `target_resolution_A`. Inputs besides the particles, all optional: `volumes` (its first
map is the consensus; without it the consensus is reconstructed from the particles),
`initial_volumes` (K maps for `init_mode` "input"), `mask` (solvent mask; without it one is
made from the consensus: threshold `mask_threshold` x max, dilated to `mask_near_A`, soft edge
to `mask_far_A`) and `focus_mask` (classes differ only inside it; the consensus explains the
rest). The FSC split is rlnRandomSubset when present (unless `force_redo_fsc_split`), else
particle-index parity; `per_particle_scale` "input" reads cdagScale.

Outputs: `volumes` (K maps ordered by size (`reorder_by_size`), each with half maps, FSC
table and the solvent mask, at the particles' box: zero-padded in Fourier space when the
working box is smaller) and `particles` (all, with rlnClassNumber, rlnMaxValueProbDistribution,
cdagClassESS, cdagScale and the posterior of every class cdagClassPosterior<k>). Plots: maps,
class sizes, class ESS histogram, class switches and RMS map change per iteration, class
fractions, FSC. Checkpoints every `checkpoint_every` iterations; a rerun resumes.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import Field

from jobs import plots2d, plots3d
from jobs.artifacts import Mask, ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.mrc import write_mrc
from jobs.io.star import ParticleTables
from jobs.particles import poses_3d, random_subsets, read_tables, write_particle_star
from jobs.volumes import MapOut, maps_at, read_mask, write_volume_set
from jobs.working_set import WorkingSet, working_geometry
from kernels import class3d as c3
from kernels.backend import get_xp, to_host
from kernels.fourier import fourier_pad

STATE_FILE = "state.npz"
POSTERIOR_PREFIX = "cdagClassPosterior"


class Params(JobParams):
    """3D classification without alignment; names follow cryoSPARC's job."""

    num_classes: int = Field(2, ge=2, description="Number of classes")
    target_resolution_A: float = Field(4.0, gt=0, description="Target resolution (Å): working box and band")
    num_oem_epochs: int = Field(2, ge=0, description="Number of O-EM epochs")
    batch_size_per_class: int = Field(1000, ge=1, description="O-EM batch size (per class)")
    learning_rate_init: float = Field(0.4, gt=0, le=1, description="O-EM learning rate init")
    learning_rate_half_life: float = Field(50.0, ge=0,
                                           description="O-EM learning rate half-life (% of O-EM iterations; 0: fixed)")
    fsc_every: int = Field(10, ge=1, description="O-EM iterations between class FSC updates")
    convergence_criterion_percent: float = Field(2.0, gt=0, lt=100,
                                                 description="Convergence criterion (% of particles changing class)")
    rms_density_change_check: bool = Field(False, description="Also require the RMS density change to converge")
    rms_density_change_threshold: float = Field(0.01, gt=0, description="RMS density change threshold")
    max_full_iters: int = Field(25, ge=1, description="Maximum full EM iterations")
    init_lowpass_res_A: float = Field(20.0, gt=0, description="Initialization structure lowpass resolution (Å)")
    init_mode: Literal["simple", "input"] = Field("simple", description="Initialization mode")
    init_subset_size: int = Field(1000, ge=1, description="Particles per class for simple initialization")
    class_similarity: float = Field(0.5, ge=0, le=1, description="Class similarity (annealed to 0)")
    class_similarity_anneal_end: int = Field(10, ge=0, description="Iteration where class similarity reaches 0")
    auto_tune_class_similarity: bool = Field(False, description="Auto-tune the initial class similarity")
    target_class_ess_fraction: float = Field(0.75, gt=0, le=1, description="Target class ESS fraction (auto-tuning)")
    force_hard_classification: bool = Field(False, description="Force hard classification")
    per_particle_scale: Literal["none", "input", "optimal"] = Field("optimal", description="Per-particle scale")
    highpass_res_A: float | None = Field(None, gt=0, description="Highpass resolution (Å); None: no highpass")
    mask_threshold: float = Field(0.2, gt=0, lt=1, description="Auto mask threshold (fraction of max)")
    mask_near_A: float = Field(10.0, ge=0, description="Auto mask near (Å): dilation")
    mask_far_A: float = Field(20.0, gt=0, description="Auto mask far (Å): end of the soft edge")
    force_redo_fsc_split: bool = Field(False, description="Ignore rlnRandomSubset; split by particle index")
    reorder_by_size: bool = Field(True, description="Reorder classes by size")
    checkpoint_every: int = Field(1, ge=1, description="Iterations between checkpoints")
    chunk_size: int = Field(1000, ge=1, description="Particles per chunk in full passes")


def _alpha(tables: ParticleTables, params: Params) -> np.ndarray | None:
    if params.per_particle_scale != "input":
        return None
    if not tables.has("cdagScale"):
        raise JobInputError(f"{tables.source}: per_particle_scale 'input' needs a cdagScale column")
    a = tables.numeric("cdagScale")
    if (a <= 0).any():
        raise JobInputError(f"{tables.row(int(np.flatnonzero(a <= 0)[0]))}: cdagScale must be positive")
    return a


def _settings(params: Params, D: int, a: float, r_max: int) -> c3.Settings:
    r_hp = 0
    if params.highpass_res_A is not None:
        r_hp = int(np.floor(D * a / params.highpass_res_A))
        if r_hp >= r_max:
            raise JobInputError(f"highpass_res_A {params.highpass_res_A} Å leaves no band below the target "
                                f"resolution {params.target_resolution_A} Å")
    if params.mask_far_A <= params.mask_near_A:
        raise JobInputError(f"mask_far_A {params.mask_far_A} must exceed mask_near_A {params.mask_near_A}")
    return c3.Settings(
        n_classes=params.num_classes, D=D, pixel_size=a, r_max=r_max,
        r_init=max(1.0, D * a / params.init_lowpass_res_A), r_hp=r_hp, n_oem_epochs=params.num_oem_epochs,
        batch_per_class=params.batch_size_per_class, lr_init=params.learning_rate_init,
        lr_half_life=params.learning_rate_half_life, fsc_every=params.fsc_every,
        switch_tol=params.convergence_criterion_percent / 100.0, rms_check=params.rms_density_change_check,
        rms_tol=params.rms_density_change_threshold, max_full_iters=params.max_full_iters,
        class_similarity=params.class_similarity, similarity_end=params.class_similarity_anneal_end,
        auto_similarity=params.auto_tune_class_similarity, target_ess_fraction=params.target_class_ess_fraction,
        force_hard=params.force_hard_classification, scale_mode=params.per_particle_scale,
        init_subset=params.init_subset_size, mask_threshold=params.mask_threshold,
        mask_near_px=params.mask_near_A / a, mask_far_px=params.mask_far_A / a, chunk=params.chunk_size,
    )


def _save(ctx: JobContext, eng: c3.Class3D) -> None:
    path = ctx.checkpoint_dir / STATE_FILE
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **eng.state())
    tmp.replace(path)


def _particles_out(ctx: JobContext, tables: ParticleTables, ps: ParticleSet, eng: c3.Class3D) -> ParticleSet:
    df = tables.particles.drop(columns=[c for c in tables.particles if c.startswith(POSTERIOR_PREFIX)])
    cls = eng.cls
    df["rlnClassNumber"] = cls + 1
    df["rlnMaxValueProbDistribution"] = eng.p[np.arange(cls.size), cls]
    df["cdagClassESS"] = eng.ess
    df["cdagScale"] = eng.alpha
    for k in range(eng.s.n_classes):
        df[f"{POSTERIOR_PREFIX}{k + 1}"] = eng.p[:, k]
    new = ParticleTables(optics=tables.optics, particles=df, source=tables.source)
    return write_particle_star(ctx, "particles", new, ps)


def _ess_histogram(ess: np.ndarray, K: int) -> Figure:
    fig = Figure(figsize=(5.0, 3.0))
    ax = fig.add_subplot()
    ax.hist(ess, bins=np.linspace(1.0, K, 41))
    ax.set_xlabel("class ESS (1 / sum p²)")
    ax.set_ylabel("particles")
    ax.set_title(f"mean {ess.mean():.2f} of {K} classes", fontsize=9)
    fig.tight_layout()
    return fig


def _convergence(history: dict[str, list], switch_tol: float) -> Figure:
    fig = Figure(figsize=(7.5, 3.0))
    it = np.arange(len(history["switched"]))
    full = np.asarray(history["full"], dtype=bool)
    for i, (key, label, tol) in enumerate((("switched", "particles changing class (%)", 100 * switch_tol),
                                           ("rms_change", "RMS map change / consensus RMS", None))):
        ax = fig.add_subplot(1, 2, i + 1)
        y = np.asarray(history[key], dtype=float) * (100 if key == "switched" else 1)
        ax.plot(it, y, color="grey", lw=0.8)
        ax.plot(it[~full], y[~full], "o", ms=3, label="O-EM")
        ax.plot(it[full], y[full], "s", ms=3, label="full EM")
        if tol is not None:
            ax.axhline(tol, color="red", lw=0.8, ls="--")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    tables = read_tables(ps, ctx.project_dir)
    N, K = len(tables), params.num_classes
    if N < 2 * K:
        raise JobInputError(f"{N} particles are too few for {K} classes")
    D, a, r_max = working_geometry(ps.box, ps.pixel_size, params.target_resolution_A)
    R, shifts = poses_3d(tables, a)
    halves = random_subsets(tables, params.force_redo_fsc_split, "force_redo_fsc_split")
    alpha = _alpha(tables, params)
    consensus = maps_at(inputs.get("volumes"), ctx, D, a, "volumes")
    init = maps_at(inputs.get("initial_volumes"), ctx, D, a, "initial_volumes")
    if params.init_mode == "input" and (init is None or len(init) != K):
        raise JobInputError(f"init_mode 'input' needs {K} maps in initial_volumes, got "
                            f"{0 if init is None else len(init)}")
    if params.init_mode == "simple" and init is not None:
        raise JobInputError("initial_volumes given but init_mode is 'simple'; set init_mode 'input'")
    solvent = read_mask(inputs.get("mask"), ctx, D, a, "mask")
    focus = read_mask(inputs.get("focus_mask"), ctx, D, a, "focus_mask")
    settings = _settings(params, D, a, r_max)
    xp = get_xp()
    eng = c3.Class3D(settings, xp, R, shifts, params.seed, halves)
    src = WorkingSet(ps, tables, ctx, D, a, xp)

    def progress(label: str, done: int, total: int) -> None:
        ctx.check_cancelled()
        ctx.progress(label, done, total)

    ctx.log.info(f"{N} particles, box {ps.box} -> {D} px ({a:.3g} Å/px), band {settings.r_hp}-{r_max} shells, "
                 f"{K} classes, {eng.n_oem} O-EM iterations, backend {ctx.backend}")
    path = ctx.checkpoint_dir / STATE_FILE
    if path.is_file():
        with np.load(path) as d:
            eng.load_state({k: d[k] for k in d.files})
        ctx.log.info(f"resuming after {eng.t} iterations from {path.name}")
    else:
        ctx.log.info(f"consensus: {'input map' if consensus else 'reconstructed'}; solvent mask: "
                     f"{'input' if solvent is not None else 'automatic'}; focus mask: {focus is not None}")
        try:
            eng.prepare(src.load, None if consensus is None else consensus[0], solvent, focus, init, alpha, progress)
        except ValueError as exc:
            raise JobInputError(f"class_3d: {exc}") from exc

    def after(m: dict[str, Any]) -> None:
        t = eng.t - 1
        for name in ("switched", "rms_change", "class_fractions", "mean_class_ess", "resolution_A"):
            ctx.metric(name, m[name], t)
        ctx.log.info(f"iteration {t} ({'full' if m['full'] else 'O-EM'}): {100 * m['switched']:.1f}% switched, "
                     f"RMS change {m['rms_change']:.4f}, fractions {m['class_fractions']}")
        ctx.progress("iterations", eng.t, eng.n_oem + settings.max_full_iters)
        if eng.t % params.checkpoint_every == 0 or eng.finished:
            _save(ctx, eng)
        ctx.check_cancelled()

    ctx.check_cancelled()
    eng.run(src.load, after, progress)
    ctx.log.info(f"{'converged' if eng.converged else 'stopped'} after {eng.n_full} full iterations")
    if params.reorder_by_size:
        eng.order_by_size()
    particles = _particles_out(ctx, tables, ps, eng)

    def up(v: Any) -> np.ndarray:
        v = to_host(v)
        return fourier_pad(v, ps.box, ndim=3) if ps.box > D else v

    maps = []
    for k in range(K):
        ha, hb = eng.half_maps(k)
        maps.append(MapOut(up(eng.vols[k]), up(ha), up(hb), eng.fsc[k], float(eng.resolution[k])))
    volumes = write_volume_set(ctx, "volume", maps, ps.pixel_size)
    mask_path = ctx.path("solvent_mask.mrc")
    write_mrc(mask_path, np.clip(up(eng.solvent), 0.0, 1.0), ps.pixel_size)
    volumes = volumes.model_copy(update={"volumes": [v.model_copy(update={"mask": ctx.ref(mask_path)})
                                                     for v in volumes.volumes]})
    counts = np.bincount(eng.cls, minlength=K)
    ess = eng.ess
    ctx.plot("maps", plots3d.map_views([m.map for m in maps], [f"class {k + 1}: {counts[k]}" for k in range(K)]),
             caption=f"{K} classes: projections and central slices (particles per class)")
    ctx.plot("class_sizes", plots2d.class_sizes(np.arange(1, K + 1), counts), caption="Particles per class")
    ctx.plot("class_ess", _ess_histogram(ess, K), caption="Class ESS per particle (1: one class, K: undecided)")
    ctx.plot("convergence", _convergence(eng.history, settings.switch_tol),
             caption="Particles changing class and RMS map change per iteration")
    ctx.plot("class_fractions", plots3d.class_fractions(np.asarray(eng.history["class_fractions"])),
             caption="Class fractions per iteration")
    ctx.plot("fsc", plots3d.fsc_curves(list(eng.fsc), [f"class {k + 1}" for k in range(K)], D, a),
             caption="Half-map FSC per class")
    ctx.metric("class_sizes", counts.tolist())
    ctx.metric("class_resolution_A", [round(float(r), 2) for r in eng.resolution])
    ctx.metric("mean_class_ess_final", float(ess.mean()))
    ctx.metric("full_iterations", eng.n_full)
    ctx.metric("converged", int(eng.converged))
    return {"volumes": volumes, "particles": particles}


JOB = JobType(
    name="class_3d",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"ctf", "alignments3D"}), help="Particles with consensus poses"),
            "volumes": Slot(VolumeSet, optional=True, help="Consensus map (the first map)"),
            "initial_volumes": Slot(VolumeSet, optional=True, help="K initial maps (init_mode 'input')"),
            "mask": Slot(Mask, optional=True, help="Solvent mask"),
            "focus_mask": Slot(Mask, optional=True, help="Focus mask (region to classify)")},
    outputs={"volumes": VolumeSet, "particles": ParticleSet},
    version=1,
    run=run,
    summary="3D classification without alignment (online EM then full EM, optional focus mask)",
    adds={"particles": frozenset({"class"})},
    passes={"particles": "particles"},
    gpu=True,
)
