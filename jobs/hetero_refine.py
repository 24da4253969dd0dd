"""hetero_refine: heterogeneous refinement of all particles against K input maps (§7).

Engine: kernels/hetero.py. The K references are the maps of the `volumes` input (e.g. an
ab-initio job's good and junk classes), optionally a subset (`use_classes`), resampled to the
refinement box (`refinement_box_size`, cryoSPARC's "Refinement box size (voxels)"; particles
are Fourier-cropped to it), low-passed to `initial_lowpass_res_A` and, with
`reestimate_greyscale` (RELION's "Ref. map is on absolute greyscale?" = No), each brought to the
data's scale (maps of different jobs or programs carry different scales). Online EM on batches of
`batch_size_per_class` x K particles until < `convergence_switch_fraction` of a batch changes
class (or `max_oem_iters`), then `num_final_full_iters` full passes over all particles.

Outputs: `volumes` (K maps with half maps and FSC, at the particles' box and pixel size:
upsampled by zero-padding when the refinement box is smaller) and `particles` (all, with
rlnClassNumber, rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst of the assigned class,
rlnMaxValueProbDistribution, cdagClassESS). Checkpoints every `checkpoint_every` O-EM
iterations; a rerun resumes after the last one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from jobs import plots2d, plots3d
from jobs.artifacts import ParticleSet, VolumeSet
from jobs.base import JobParams, JobType, PointGroup, Slot
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from jobs.volumes import MapOut, read_maps, resample, write_volume_set
from jobs.working_set import WorkingSet
from kernels import hetero as ht
from kernels.backend import get_xp, to_host
from kernels.fourier import Band, fourier_pad
from kernels.rotations import matrix_to_euler

STATE_FILE = "state.npz"


class Params(JobParams):
    """Heterogeneous refinement; names follow cryoSPARC's job."""

    use_classes: list[int] | None = Field(None, description="Input maps to use (1-based); None: all")
    refinement_box_size: int = Field(128, ge=16, description="Refinement box size (voxels)")
    initial_lowpass_res_A: float = Field(20.0, gt=0, description="Initial resolution (Å)")
    batch_size_per_class: int = Field(1000, ge=2, description="Batch size per class")
    num_random_iters: int = Field(5, ge=0, description="Initial random assignment iterations")
    max_oem_iters: int = Field(40, ge=1, description="Maximum online-EM iterations")
    learning_rate_random: float = Field(0.2, gt=0, le=1, description="O-EM learning rate during randomisation")
    learning_rate_init: float = Field(0.1, gt=0, le=1, description="O-EM learning rate init")
    learning_rate_half_life: float = Field(50.0, gt=0, description="O-EM learning rate half-life (iterations)")
    halfmap_decay: float = Field(0.9, ge=0, lt=1, description="Half-map decay constant")
    backprojection_res_factor: float = Field(1.5, ge=1, description="Back-project to this x best class resolution")
    convergence_switch_fraction: float = Field(0.05, gt=0, lt=1, description="Assignment convergence criterion")
    num_final_full_iters: int = Field(2, ge=1, description="Number of final full iterations")
    force_hard_classification: bool = Field(False, description="Hard class assignments in the M-step")
    initial_sigma_scale: float = Field(3.0, ge=1, description="Initial noise scale (annealed to 1)")
    offset_range_A: float | None = Field(None, gt=0, description="Shift search radius (Å); None: 10% of the box")
    symmetry: PointGroup = Field("C1", description="Point group (Cn or Dn)")
    reestimate_greyscale: bool = Field(True, description="Re-estimate greyscale level of input maps")
    checkpoint_every: int = Field(5, ge=1, description="O-EM iterations between checkpoints")
    chunk_size: int = Field(1000, ge=1, description="Particles per chunk in full passes")


def _references(params: Params, vs: VolumeSet, ctx: JobContext, D: int, a: float) -> list[np.ndarray]:
    maps = read_maps(vs, ctx.project_dir)
    pick = list(range(len(maps))) if params.use_classes is None else [c - 1 for c in params.use_classes]
    bad = [c + 1 for c in pick if not 0 <= c < len(maps)]
    if bad:
        raise JobInputError(f"use_classes {bad}: the volumes input has {len(maps)} maps")
    if len(pick) < 1:
        raise JobInputError("use_classes selects no map")
    return [resample(maps[c], vs.pixel_size, D, a, f"volume {c + 1}") for c in pick]


def _state(eng: ht.HeteroRefine) -> dict[str, np.ndarray]:
    return {"vols": to_host(eng.vols), "pi": eng.pi, "sigma2": to_host(eng.sigma2),
            "sigma2_0": to_host(eng.sigma2_0), "fsc": eng.fsc, "resolution": eng.resolution,
            "last": eng.last, "r": np.asarray(eng.r),
            "acc_data": np.stack([[to_host(a.data) for a in row] for row in eng.acc]),
            "acc_weight": np.stack([[to_host(a.weight) for a in row] for row in eng.acc])}


def _load_state(eng: ht.HeteroRefine, d: dict[str, np.ndarray]) -> None:
    xp = eng.xp
    eng.vols, eng.pi = xp.asarray(d["vols"]), np.asarray(d["pi"])
    eng.sigma2, eng.sigma2_0 = xp.asarray(d["sigma2"]), xp.asarray(d["sigma2_0"])
    eng.fsc, eng.resolution, eng.last, eng.r = d["fsc"], d["resolution"], d["last"], int(d["r"])
    for h, row in enumerate(eng.acc):
        for k, a in enumerate(row):
            a.data, a.weight = xp.asarray(d["acc_data"][h, k]), xp.asarray(d["acc_weight"][h, k])


def _particles_out(ctx: JobContext, tables: ParticleTables, ps: ParticleSet, out: ht.Assignment,
                   pixel_size: float) -> ParticleSet:
    rot, tilt, psi = matrix_to_euler(out.R)
    df = tables.particles.copy()
    df["rlnClassNumber"] = out.cls + 1
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = rot, tilt, psi
    df["rlnOriginXAngst"] = -out.shift[:, 0] * pixel_size
    df["rlnOriginYAngst"] = -out.shift[:, 1] * pixel_size
    df["rlnMaxValueProbDistribution"] = out.p[np.arange(out.cls.size), out.cls]
    df["cdagClassESS"] = out.class_ess
    new = ParticleTables(optics=tables.optics, particles=df, source=tables.source)
    return write_particle_star(ctx, "particles", new, ps)


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, Any]:
    ps: ParticleSet = inputs["particles"]
    tables = read_tables(ps, ctx.project_dir)
    N = len(tables)
    D = min(ps.box, params.refinement_box_size - params.refinement_box_size % 2)
    a = ps.box * ps.pixel_size / D
    refs = _references(params, inputs["volumes"], ctx, D, a)
    K = len(refs)
    if N < 2 * K:
        raise JobInputError(f"{N} particles are too few for {K} classes")
    r_init = int(max(2, min(D // 2 - 1, round(D * a / params.initial_lowpass_res_A))))
    shift = max(2.0, 0.1 * D) if params.offset_range_A is None else max(1.0, params.offset_range_A / a)
    settings = ht.Settings(
        n_classes=K, D=D, pixel_size=a, r_max=D // 2 - 1, r_init=r_init,
        batch_per_class=params.batch_size_per_class, n_random_iters=params.num_random_iters,
        max_oem_iters=params.max_oem_iters, lr_random=params.learning_rate_random,
        lr_init=params.learning_rate_init, lr_half_life=params.learning_rate_half_life,
        halfmap_decay=params.halfmap_decay, bp_factor=params.backprojection_res_factor,
        switch_tol=params.convergence_switch_fraction, n_full_iters=params.num_final_full_iters,
        force_hard=params.force_hard_classification, sigma_scale=params.initial_sigma_scale,
        shift_extent_px=shift, symmetry=params.symmetry, greyscale=params.reestimate_greyscale,
    )
    xp = get_xp()
    eng = ht.HeteroRefine(settings, xp, N, params.seed)
    src = WorkingSet(ps, tables, ctx, D, a, xp)
    ctx.log.info(f"{N} particles, box {ps.box} -> {D} px ({a:.3g} Å/px), {K} classes, backend {ctx.backend}")
    path = ctx.checkpoint_dir / STATE_FILE
    done, fractions, converged = -1, [], False
    if path.is_file():
        with np.load(path) as d:
            state = {k: d[k] for k in d.files}
        _load_state(eng, state)
        done, fractions, converged = int(state["done"]), list(state["fractions"]), bool(state["converged"])
        ctx.log.info(f"resuming after O-EM iteration {done}")
    else:
        eng.initialise(refs, src.load)
        if params.reestimate_greyscale:
            ctx.log.info("greyscale of the start maps (x the input): "
                         + ", ".join(f"{g:.3g}" for g in eng.greyscale))
            ctx.metric("greyscale", [round(float(g), 4) for g in eng.greyscale])
    t = done
    while not converged and t + 1 < params.max_oem_iters:
        t += 1
        ctx.check_cancelled()
        _, _, m = eng.oem_iteration(t, src.load)
        fractions.append(m["class_fractions"])
        for name in ("resolution_A", "class_fractions", "switched", "mean_class_ess", "band_shells"):
            ctx.metric(name, m[name], t)
        ctx.progress("O-EM iterations", t + 1, params.max_oem_iters)
        converged = eng.converged(t, m)
        if converged or (t + 1) % params.checkpoint_every == 0:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **_state(eng), done=np.asarray(t), fractions=np.asarray(fractions),
                     converged=np.asarray(converged))
            tmp.replace(path)
    ctx.log.info(f"online EM {'converged' if converged else 'stopped'} after {t + 1} iterations")
    band = Band(D, eng.r)
    for f in range(params.num_final_full_iters):
        out = eng.full_iteration(src.stream(params.chunk_size, band), band)
        ctx.metric("class_fractions", [round(float(x), 4) for x in eng.pi], t + 1 + f)
    particles = _particles_out(ctx, tables, ps, out, a)

    def up(v: Any) -> np.ndarray:
        v = to_host(v)
        return fourier_pad(v, ps.box, ndim=3) if ps.box > D else v

    maps = []
    for k in range(K):
        ha, hb = eng.half_maps(k)
        maps.append(MapOut(up(eng.vols[k]), up(ha), up(hb), eng.fsc[k], float(eng.resolution[k])))
    volumes = write_volume_set(ctx, "volume", maps, ps.pixel_size)
    counts = np.bincount(out.cls, minlength=K)
    ctx.plot("maps", plots3d.map_views([m.map for m in maps],
                                       [f"class {k + 1}: {counts[k]}" for k in range(K)]),
             caption=f"{K} classes: projections and central slices (particles per class)")
    ctx.plot("fsc", plots3d.fsc_curves(list(eng.fsc), [f"class {k + 1}" for k in range(K)], D, a),
             caption="Half-map FSC per class")
    ctx.plot("class_sizes", plots2d.class_sizes(np.arange(1, K + 1), counts), caption="Particles per class")
    if fractions:
        ctx.plot("class_fractions", plots3d.class_fractions(np.asarray(fractions)),
                 caption="Class fractions per O-EM iteration")
    ctx.metric("class_sizes", counts.tolist())
    ctx.metric("class_resolution_A", [round(float(r), 2) for r in eng.resolution])
    return {"volumes": volumes, "particles": particles}


JOB = JobType(
    name="hetero_refine",
    params=Params,
    inputs={"particles": Slot(ParticleSet, frozenset({"ctf"}), help="Particles with CTF"),
            "volumes": Slot(VolumeSet, help="K initial maps (e.g. ab-initio classes)")},
    outputs={"volumes": VolumeSet, "particles": ParticleSet},
    version=2,
    run=run,
    summary="Heterogeneous refinement: K-class 3D refinement with global pose search (online EM)",
    adds={"particles": frozenset({"class", "alignments3D"})},
    passes={"particles": "particles"},
    gpu=True,
)
