"""var_3d: 3D variability analysis (algorithms.md §9; cryoSPARC "3D Variability", 3DVA).

Engine: kernels/var3d.py (probabilistic PCA by EM with fixed poses). The particles keep their
consensus poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst = -t x pixel size, read as in class_3d)
and are Fourier-cropped to the working box whose band ends at `target_resolution_A` (None: the
particles' own box, band to Nyquist - 1). Optional inputs: `volumes` (its first map is the
consensus V0; without it V0 is reconstructed from the particles) and `mask` (without it one is
made from the consensus: threshold `mask_threshold` x max, dilated to `mask_near_A`, soft edge to
`mask_far_A`). `per_particle_scale` "input" reads cdagScale. Note that "optimal" scales absorb
part of a variability that changes the total density of the particle. `pose_sd_deg` and
`shift_sd_A` above 0 let each particle's pose move a little while its latents are fitted
(kernels/var3d.py, "pose freedom"; not in cryoSPARC): for consensus poses a few degrees off,
whose errors otherwise fill the top components. `oversample` extra components are carried
through the first half of the iterations and then dropped (kernels/var3d.py: the K-th component
no longer depends on the random start; K + 2 maps and accumulators meanwhile; 0: off).

Outputs: `volumes` (map 1: the mean V0, maps 2..K+1: the components in order of decreasing
variance, each of unit norm inside the mask at the working box, all with the mask, at the
particles' box: Fourier-padded when the working box is smaller; summary: num_components and
eigenvalues) and `particles` (all, with cdagLatent<k> = the posterior mean latent coordinate in
units of component k (cryoSPARC components_mode_<k>/value), cdagLatentStd<k> its posterior
standard deviation, and cdagScale). Plots: mean and components, latent histograms and scatter,
convergence. Checkpoints every `checkpoint_every` iterations; a rerun resumes.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from pydantic import Field

from jobs import plots3d
from jobs.artifacts import Mask, ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.mrc import write_mrc
from jobs.io.star import ParticleTables
from jobs.particles import poses_3d, read_tables, write_particle_star
from jobs.volumes import MapOut, maps_at, read_mask, write_volume_set
from jobs.working_set import WorkingSet, working_geometry
from kernels import var3d as v3
from kernels.backend import get_xp, to_host
from kernels.fourier import fourier_pad

STATE_FILE = "state.npz"
#: Latent columns: cdagLatent<k> (posterior mean) and cdagLatentStd<k> (posterior std), k = 1..K.
LATENT_PREFIX = "cdagLatent"


class Params(JobParams):
    """3D variability analysis; names follow cryoSPARC's job."""

    num_components: int = Field(3, ge=1, le=20, description="Number of modes to solve (K)")
    num_iterations: int = Field(20, ge=1, description="Number of iterations")
    filter_res_A: float | None = Field(None, gt=0, description="Filter resolution (Å): Butterworth low-pass of "
                                                               "the components; None: none")
    filter_order: float = Field(1.5, gt=0, description="Filter order (Butterworth)")
    highpass_res_A: float | None = Field(None, gt=0, description="Highpass resolution (Å), order 8; None: none")
    lambda_reg: float = Field(0.01, ge=0, description="Lambda (cryoSPARC var_lambda): Tikhonov weight of the "
                                                      "components as a fraction of the shell-mean data weight")
    per_particle_scale: Literal["none", "input", "optimal"] = Field("optimal", description="Per-particle scale")
    target_resolution_A: float | None = Field(None, gt=0, description="Refinement resolution (Å): working box "
                                                                      "and band; None: the particles' box")
    mask_threshold: float = Field(0.2, gt=0, lt=1, description="Auto mask threshold (fraction of max)")
    mask_near_A: float = Field(10.0, ge=0, description="Auto mask near (Å): dilation")
    mask_far_A: float = Field(20.0, gt=0, description="Auto mask far (Å): end of the soft edge")
    pose_sd_deg: float = Field(0.0, ge=0, le=10, description="Pose freedom (deg): s.d. of the prior on small "
                                                             "per-particle rotations fitted with the latents; 0: "
                                                             "fixed poses")
    shift_sd_A: float = Field(0.0, ge=0, description="Shift freedom (Å): s.d. of the prior on small per-particle "
                                                     "shifts fitted with the latents; 0: fixed shifts")
    oversample: int = Field(2, ge=0, le=10, description="Extra components carried through the first half of the "
                                                         "iterations, then dropped (convergence from any random "
                                                         "start); 0: off")
    checkpoint_every: int = Field(1, ge=1, description="Iterations between checkpoints")
    chunk_size: int = Field(1000, ge=1, description="Particles per chunk")


def scale_column(tables: ParticleTables) -> np.ndarray:
    """cdagScale (N,), checked positive."""
    if not tables.has("cdagScale"):
        raise JobInputError(f"{tables.source}: per-particle scale 'input' needs a cdagScale column")
    a = tables.numeric("cdagScale")
    if (a <= 0).any():
        raise JobInputError(f"{tables.row(int(np.flatnonzero(a <= 0)[0]))}: cdagScale must be positive")
    return a


def engine_settings(params: Params, D: int, a: float, r_max: int) -> v3.Settings:
    """The engine's settings for the job's params at working box D (a Å/px, band r_max shells)."""
    if params.highpass_res_A is not None and params.filter_res_A is not None \
            and params.highpass_res_A <= params.filter_res_A:
        raise JobInputError(f"highpass_res_A {params.highpass_res_A} Å must be coarser than filter_res_A "
                            f"{params.filter_res_A} Å")
    if params.mask_far_A <= params.mask_near_A:
        raise JobInputError(f"mask_far_A {params.mask_far_A} must exceed mask_near_A {params.mask_near_A}")
    return v3.Settings(
        n_components=params.num_components, D=D, pixel_size=a, r_max=r_max, n_iterations=params.num_iterations,
        filter_res_A=params.filter_res_A, filter_order=params.filter_order, highpass_res_A=params.highpass_res_A,
        lambda_reg=params.lambda_reg, scale_mode=params.per_particle_scale, mask_threshold=params.mask_threshold,
        mask_near_px=params.mask_near_A / a, mask_far_px=params.mask_far_A / a, chunk=params.chunk_size,
        pose_sd_deg=params.pose_sd_deg, shift_sd_px=params.shift_sd_A / a, oversample=params.oversample,
    )


def _save(ctx: JobContext, eng: v3.Var3D) -> None:
    path = ctx.checkpoint_dir / STATE_FILE
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **eng.state())
    tmp.replace(path)


def _particles_out(ctx: JobContext, tables: ParticleTables, ps: ParticleSet, eng: v3.Var3D) -> ParticleSet:
    df = tables.particles.drop(columns=[c for c in tables.particles if c.startswith(LATENT_PREFIX)])
    for k in range(eng.s.n_components):
        df[f"{LATENT_PREFIX}{k + 1}"] = eng.z[:, k]
        df[f"{LATENT_PREFIX}Std{k + 1}"] = eng.z_std[:, k]
    df["cdagScale"] = eng.alpha
    new = ParticleTables(optics=tables.optics, particles=df, source=tables.source)
    return write_particle_star(ctx, "particles", new, ps)


def latent_figure(z: np.ndarray, labels: np.ndarray | None = None) -> Figure:
    """Histogram of each latent coordinate z (N, K) and, for K >= 2, z_1 against z_2 (coloured by
    ``labels`` (N,) if given)."""
    K = z.shape[1]
    n = K + (K >= 2)
    fig = Figure(figsize=(2.6 * n, 2.6))
    for k in range(K):
        ax = fig.add_subplot(1, n, k + 1)
        ax.hist(z[:, k], bins=50)
        ax.set_xlabel(f"latent {k + 1}")
        if k == 0:
            ax.set_ylabel("particles")
    if K >= 2:
        ax = fig.add_subplot(1, n, n)
        ax.scatter(z[:, 0], z[:, 1], s=2, c=labels, cmap="tab20" if labels is not None else None,
                   alpha=0.5, rasterized=True)
        ax.set_xlabel("latent 1")
        ax.set_ylabel("latent 2")
    fig.tight_layout()
    return fig


def _convergence(history: dict[str, list]) -> Figure:
    fig = Figure(figsize=(9.0, 2.8))
    it = np.arange(1, len(history["subspace_change"]) + 1)
    ev = np.asarray(history["eigenvalues"], dtype=float).reshape(len(it), -1)
    for i, (y, label, log) in enumerate(((ev, "eigenvalue (latent variance)", True),
                                         (history["subspace_change"], "subspace change (sin max angle)", False),
                                         (history["loglik_gain"], "log-likelihood gain / particle", False))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(it, np.asarray(y, dtype=float), marker="o", ms=3)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    return fig


def _warn_beyond_consensus(vs: VolumeSet | None, fitted_A: float, ctx: JobContext) -> None:
    """Warn when the components are fitted to a finer resolution (Å) than the consensus map's
    (its GS-FSC): the mean lacks that band, so the components model it instead of the
    variability (demo: |corr(latent, t)| 0.23 at 10 Å vs 0.71 at 18 Å over a 17.5 Å consensus)."""
    res = vs.volumes[0].resolution_A if vs is not None else None
    if res is not None and fitted_A < res:
        ctx.log.warning(f"components fitted to {fitted_A:.3g} Å but the consensus map holds {res:.3g} Å: they will "
                        f"model the band the mean lacks; set target_resolution_A or filter_res_A >= {res:.3g} Å")


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    tables = read_tables(ps, ctx.project_dir)
    N, K = len(tables), params.num_components
    if N < 2 * K + 2:
        raise JobInputError(f"{N} particles are too few for {K} components")
    if params.target_resolution_A is None:
        D, a, r_max = ps.box, ps.pixel_size, ps.box // 2 - 1
    else:
        D, a, r_max = working_geometry(ps.box, ps.pixel_size, params.target_resolution_A)
    R, shifts = poses_3d(tables, a)
    alpha = scale_column(tables) if params.per_particle_scale == "input" else None
    consensus = maps_at(inputs.get("volumes"), ctx, D, a, "volumes")
    _warn_beyond_consensus(inputs.get("volumes"), max(D * a / r_max, params.filter_res_A or 0.0), ctx)
    mask = read_mask(inputs.get("mask"), ctx, D, a, "mask")
    settings = engine_settings(params, D, a, r_max)
    xp = get_xp()
    eng = v3.Var3D(settings, xp, R, shifts, params.seed)
    src = WorkingSet(ps, tables, ctx, D, a, xp)

    def progress(label: str, done: int, total: int) -> None:
        ctx.check_cancelled()
        ctx.progress(label, done, total)

    ctx.log.info(f"{N} particles, box {ps.box} -> {D} px ({a:.3g} Å/px), band to {r_max} shells, {K} components, "
                 f"{params.num_iterations} iterations, backend {ctx.backend}")
    path = ctx.checkpoint_dir / STATE_FILE
    if path.is_file():
        with np.load(path) as d:
            eng.load_state({k: d[k] for k in d.files})
        ctx.log.info(f"resuming after {eng.t} iterations from {path.name}")
    else:
        ctx.log.info(f"consensus: {'input map' if consensus else 'reconstructed'}; mask: "
                     f"{'input' if mask is not None else 'automatic'}")
        try:
            eng.prepare(src.load, None if consensus is None else consensus[0], mask, alpha, progress)
        except ValueError as exc:
            raise JobInputError(f"var_3d: {exc}") from exc

    def after(m: dict[str, Any]) -> None:
        t = eng.t - 1
        for name in ("eigenvalues", "subspace_change", "loglik_gain"):
            ctx.metric(name, m[name], t)
        ctx.log.info(f"iteration {t}: eigenvalues {[round(x, 4) for x in m['eigenvalues']]}, subspace change "
                     f"{m['subspace_change']:.4f}, log-likelihood gain {m['loglik_gain']:.4f}")
        ctx.progress("iterations", eng.t, params.num_iterations)
        if eng.t % params.checkpoint_every == 0:
            _save(ctx, eng)
        ctx.check_cancelled()

    ctx.check_cancelled()
    eng.run(src.load, after, progress)
    _save(ctx, eng)
    particles = _particles_out(ctx, tables, ps, eng)

    def up(v: Any) -> np.ndarray:
        v = to_host(v)
        return fourier_pad(v, ps.box, ndim=3) if ps.box > D else v

    mask_path = ctx.path("mask.mrc")
    write_mrc(mask_path, np.clip(up(eng.mask), 0.0, 1.0), ps.pixel_size)
    mean, comps = up(eng.V0), [up(c) for c in eng.components]
    vols = write_volume_set(ctx, "mean", [MapOut(mean)], ps.pixel_size).volumes
    vols += write_volume_set(ctx, "component", [MapOut(c) for c in comps], ps.pixel_size).volumes
    variance = eng.latent_variance()
    volumes = VolumeSet(volumes=[v.model_copy(update={"mask": ctx.ref(mask_path)}) for v in vols], box=ps.box,
                        pixel_size=ps.pixel_size,
                        summary={"num_components": K, "eigenvalues": [float(x) for x in variance]})
    ctx.plot("components", plots3d.map_views([mean, *comps], ["mean"] + [f"component {k + 1}" for k in range(K)],
                                             signed=[False] + [True] * K),
             caption="Mean (grey) and components (blue negative, red positive): projections and central slices")
    ctx.plot("latents", latent_figure(eng.z), caption="Latent coordinates (posterior means)")
    ctx.plot("convergence", _convergence(eng.history), caption="Eigenvalues, subspace change and log-likelihood gain "
                                                                "per iteration")
    ctx.metric("eigenvalues_final", [float(x) for x in variance])
    ctx.metric("latent_std", [float(x) for x in eng.z.std(axis=0)])
    ctx.metric("iterations", eng.t)
    return {"volumes": volumes, "particles": particles}


JOB = JobType(
    name="var_3d",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"ctf", "alignments3D"}), help="Particles with consensus poses"),
            "volumes": Slot(VolumeSet, optional=True, help="Consensus map (the first map)"),
            "mask": Slot(Mask, optional=True, help="Solvent / focus mask")},
    outputs={"volumes": VolumeSet, "particles": ParticleSet},
    version=2,
    run=run,
    summary="3D variability analysis (PPCA by EM with fixed poses): mean, components and per-particle latents",
    adds={"particles": frozenset({"latent"})},
    passes={"particles": "particles"},
    gpu=True,
)
