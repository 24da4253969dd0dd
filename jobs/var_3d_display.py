"""var_3d_display: maps along the 3DVA latent coordinates (algorithms.md §9.3; cryoSPARC "3D Variability
Display"). Engine: kernels/var3d_display.py.

Inputs: the outputs of var_3d: `volumes` (map 1: mean V0, maps 2..K+1: components) and `particles`
(cdagLatent<k>, poses, CTF, cdagScale if present); optional `mask` (for the half-map FSCs of
reconstructed maps). `components` picks the components to display (1-based; default all).

Modes (`output_mode`):
- simple: for each component k, `num_frames` frames V0 + c_j V_k between the `range_percentile`
  and 100 - `range_percentile` percentiles of z_k, at the maps' box.
- intermediates: for each component k, `num_frames` Wiener reconstructions of the particles
  weighted by their position along z_k (`intermediates_window`: triangular half-width in frames,
  0 top-hat bins, -1 equal-count bins), at the working box of `target_resolution_A`, padded to
  the particles' box.
- cluster: a Gaussian mixture of `num_frames` clusters on the chosen latents, one reconstruction
  per cluster (clusters ordered by their mean on the first chosen component).

Outputs: `volumes` (frames component by component, or clusters; reconstructed maps carry their
half-map FSC table) and `particles` (rlnClassNumber: the cluster (cluster mode) or the nearest
frame along the first chosen component; rlnMaxValueProbDistribution: the cluster probability in
cluster mode). Plots: frame montage (projections, and their difference from the series' mean),
latents coloured by cluster / frame. Metrics: frame_range (first and last centre per chosen
component), map_particles (summed weight per reconstructed map, one series per component),
cluster_sizes and gmm_log_likelihood.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from jobs import plots3d
from jobs.artifacts import Mask, ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import poses_3d, read_tables, write_particle_star
from jobs.var_3d import LATENT_PREFIX, latent_figure
from jobs.volumes import MapOut, read_maps, read_mask, write_volume_set
from jobs.working_set import WorkingSet, working_geometry
from kernels import var3d_display as vd
from kernels.backend import get_xp, to_host
from kernels.fourier import Band, fourier_pad
from kernels.fsc import resolution_at


class Params(JobParams):
    """3DVA display; names follow cryoSPARC's job."""

    output_mode: Literal["simple", "intermediates", "cluster"] = Field("simple", description="Output mode")
    num_frames: int = Field(20, ge=2, le=200, description="Number of frames (per component) or clusters")
    range_percentile: float = Field(3.0, ge=0, lt=50, description="Min/max range percentile of the latents")
    intermediates_window: float = Field(2.0, ge=-1, description="Intermediates window (frames): triangular "
                                                                "half-width; 0 top-hat bins; -1 equal-count bins")
    components: list[int] | None = Field(None, description="Components to use (1-based); None: all")
    target_resolution_A: float | None = Field(None, gt=0, description="Resolution (Å) of reconstructed maps: "
                                                                      "working box and band; None: full")
    chunk_size: int = Field(1000, ge=1, description="Particles per chunk")

    @field_validator("intermediates_window")
    @classmethod
    def _window(cls, v: float) -> float:
        if not (v == -1 or v >= 0):
            raise ValueError("intermediates_window must be -1, 0 or positive")
        return v


def _latents(tables: ParticleTables, K: int) -> np.ndarray:
    """cdagLatent1..K (N, K)."""
    names = {int(m.group(1)) for c in tables.particles if (m := re.fullmatch(rf"{LATENT_PREFIX}(\d+)", c))}
    missing = [k for k in range(1, K + 1) if k not in names]
    if missing:
        raise JobInputError(f"{tables.source}: particles lack latent columns "
                            f"{', '.join(f'{LATENT_PREFIX}{k}' for k in missing)}; run var_3d first")
    z = np.stack([tables.numeric(f"{LATENT_PREFIX}{k}") for k in range(1, K + 1)], axis=1)
    if not np.isfinite(z).all():
        raise JobInputError(f"{tables.source}: latent columns hold non-finite values")
    return z


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    vs: VolumeSet = inputs["volumes"]
    ps: ParticleSet = inputs["particles"]
    K = len(vs.volumes) - 1
    if K < 1:
        raise JobInputError("volumes must hold the mean and at least one component (the output of var_3d)")
    comps = list(range(1, K + 1)) if params.components is None else params.components
    bad = [k for k in comps if not 1 <= k <= K]
    if bad or not comps or len(set(comps)) != len(comps):
        raise JobInputError(f"components {params.components} must be distinct values in 1..{K}")
    tables = read_tables(ps, ctx.project_dir)
    N = len(tables)
    z = _latents(tables, K)[:, np.asarray(comps) - 1]
    mode, F = params.output_mode, params.num_frames
    if mode == "cluster" and N < F:
        raise JobInputError(f"{N} particles are too few for {F} clusters")
    try:
        frames = [vd.Frames.along(z[:, j], F, params.range_percentile,
                                  params.intermediates_window if mode == "intermediates" else 0.0)
                  for j in range(len(comps))]
    except ValueError as exc:
        raise JobInputError(f"var_3d_display: {exc}") from exc
    labels = frames[0].nearest(z[:, 0])
    extra: dict[str, np.ndarray] = {}
    maps_out: list[MapOut] = []
    row_labels = [f"component {k}" for k in comps]
    xp = get_xp()
    if mode == "simple":
        vols = read_maps(vs, ctx.project_dir)
        for j, k in enumerate(comps):
            maps_out += [MapOut(m) for m in vd.simple_frames(vols[0], vols[k], frames[j].centres)]
        box, pixel = vs.box, vs.pixel_size
    else:
        if params.target_resolution_A is None:
            D, a, r_max = ps.box, ps.pixel_size, ps.box // 2 - 1
        else:
            D, a, r_max = working_geometry(ps.box, ps.pixel_size, params.target_resolution_A)
        R, shifts = poses_3d(tables, a)
        alpha = tables.numeric("cdagScale") if tables.has("cdagScale") else np.ones(N)
        halves = (tables.numeric("rlnRandomSubset").astype(np.int64) - 1 if tables.has("rlnRandomSubset")
                  else np.arange(N) % 2)
        if not np.isin(halves, (0, 1)).all():
            raise JobInputError(f"{tables.row(int(np.flatnonzero(~np.isin(halves, (0, 1)))[0]))}: "
                                "rlnRandomSubset must be 1 or 2")
        mask = read_mask(inputs.get("mask"), ctx, D, a, "mask")
        src = WorkingSet(ps, tables, ctx, D, a, xp)
        band = Band(D, r_max)

        def progress(label: str, done: int, total: int) -> None:
            ctx.check_cancelled()
            ctx.progress(label, done, total)

        def reconstruct(weights_of: Any, n: int, series: int) -> list[MapOut]:
            maps, curves, total = vd.weighted_maps(src.load, R, shifts, alpha, halves, weights_of, n, band,
                                                   params.chunk_size, xp, None if mask is None else xp.asarray(mask),
                                                   progress)
            ctx.metric("map_particles", [round(float(x), 2) for x in total], series)
            return [MapOut(fourier_pad(to_host(m), ps.box, ndim=3) if ps.box > D else to_host(m), fsc=c,
                           resolution_A=resolution_at(c, 0.143, D, a)) for m, c in zip(maps, curves, strict=True)]

        if mode == "intermediates":
            for j in range(len(comps)):
                maps_out += reconstruct(lambda idx, j=j: frames[j].weights(z[idx, j]), F, j)
        else:
            gm = vd.fit_gmm(z, F, params.seed)
            order = np.argsort(gm.means[:, 0])
            resp = gm.responsibilities(z)[:, order]
            labels = resp.argmax(axis=1)
            extra["rlnMaxValueProbDistribution"] = resp.max(axis=1)
            maps_out = reconstruct(lambda idx: np.eye(F)[labels[idx]], F, 0)
            row_labels = ["clusters"]
            ctx.metric("cluster_sizes", np.bincount(labels, minlength=F).tolist())
            ctx.metric("gmm_log_likelihood", gm.log_likelihood)
        box, pixel = ps.box, ps.pixel_size
    name = "cluster" if mode == "cluster" else "frame"
    volumes = write_volume_set(ctx, name, maps_out, pixel)
    volumes = volumes.model_copy(update={"summary": {"mode": mode, "frames": F, "components": comps}})
    df = tables.particles.assign(rlnClassNumber=labels + 1, **extra)
    particles = write_particle_star(ctx, "particles", ParticleTables(optics=tables.optics, particles=df,
                                                                    source=tables.source), ps)
    ctx.plot("frames", plots3d.series_montage([m.map for m in maps_out], len(row_labels), row_labels),
             caption=f"{mode}: projections of the {name}s along z, and minus their mean")
    ctx.plot("latents", latent_figure(z, labels), caption=f"Latents coloured by {name}")
    ctx.metric("frame_range", [float(x) for f in frames for x in (f.centres[0], f.centres[-1])])
    ctx.log.info(f"{mode}: {len(maps_out)} maps of box {box} at {pixel:.3g} Å/px from {N} particles")
    return {"volumes": volumes, "particles": particles}


JOB = JobType(
    name="var_3d_display",
    params=Params,
    inputs={"volumes": Slot(VolumeSet, help="Mean and components from var_3d"),
            "particles": Slot(ParticleSet, frozenset({"ctf", "alignments3D", "latent"}),
                              help="Particles with latent coordinates from var_3d"),
            "mask": Slot(Mask, optional=True, help="Mask for the FSC of reconstructed maps")},
    outputs={"volumes": VolumeSet, "particles": ParticleSet},
    version=1,
    run=run,
    summary="3DVA display: frames along latent coordinates (simple / intermediates) or latent-space clusters",
    adds={"particles": frozenset({"class"})},
    passes={"particles": "particles"},
    gpu=True,
)
