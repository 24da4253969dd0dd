"""rebalance_2d: group 2D classes into views ("superclasses") and cap each group's particles.

algorithms.md §4 (cryoSPARC "Rebalance 2D Classes"). Steps:
  1. Similarity of class averages, invariant to in-plane rotation and shift (and optionally
     mirroring): each average is Fourier-cropped to the band of `max_resolution_A`, softly
     masked and centred on its centre of mass (rotation-equivariant, so rotated copies of a
     view become pure rotations about the centre); then s_ij = max over psi (grid of
     `psi_step_deg`, rotations by `kernels.projection.rotate_2d`) and mirror of the normalised
     band-limited correlation of average i with rotated average j (one GEMM).
  2. Agglomerative clustering of d_ij = 1 - (s_ij + s_ji)/2 into `num_superclasses` groups
     (scipy linkage); superclasses are numbered by particle count, 1 = largest.
  3. Each particle belongs to its class's superclass. The cap is the smallest of
     `max_particles_per_superclass`, floor(`max_fraction_per_superclass` * N_input) and
     ceil(smallest superclass / `rebalance_factor`) (cryoSPARC: the smallest group is then at
     least that fraction of the largest); a superclass above the cap keeps a uniformly random
     subset of `cap` particles (job seed). No cap given: clustering only.
Outputs `particles` (kept) and `removed` partition the input in input order, with every column
kept and cdagSuperclass added.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from jobs import plots2d
from jobs.artifacts import ClassAverages2D, ParticleSet
from jobs.base import JobParams, JobType, Slot
from jobs.class_averages import class_counts, particle_classes, read_class_averages
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.star import ParticleTables
from jobs.particles import read_tables, write_particle_star
from kernels.backend import batch_size_for, get_xp, to_device, to_host, xp_of
from kernels.fourier import Band, fourier_crop, rfft2c, shift_images, soft_circular_mask
from kernels.projection import prepare_image, rotate_2d

#: Soft mask applied to averages before comparison (fractions of the working box).
MASK_RADIUS, MASK_EDGE = 0.4, 0.1


class Params(JobParams):
    """View grouping and per-group particle caps."""

    num_superclasses: int = Field(10, ge=1, description="Number of view groups (superclasses)")
    max_particles_per_superclass: int | None = Field(
        None, ge=1, description="Cap on particles per superclass"
    )
    max_fraction_per_superclass: float | None = Field(
        None, gt=0, le=1, description="Cap as a fraction of the input particle count"
    )
    rebalance_factor: float | None = Field(
        None, ge=0, le=1,
        description="cryoSPARC's factor: smallest group >= factor x largest (0: no cap, 1: equal)",
    )
    max_resolution_A: float = Field(
        20.0, gt=0, description="Highest resolution (Å) used to compare class averages"
    )
    psi_step_deg: float = Field(5.0, gt=0, le=30, description="In-plane angle step of the search")
    mirrors: bool = Field(True, description="A mirrored average counts as the same view")
    linkage: Literal["average", "complete", "single"] = Field(
        "average", description="Agglomerative clustering linkage"
    )


def _mirror_x(x: Any) -> Any:
    """Images (N, D, D) mirrored in x about the centre column D//2."""
    return xp_of(x).roll(x[..., ::-1], 1, axis=-1)


def _centre_on_mass(x: Any) -> Any:
    """Shift images (N, D, D) so the centre of mass of their positive part lies at D//2."""
    xp = xp_of(x)
    D = x.shape[-1]
    c = xp.arange(D, dtype=xp.float64) - D // 2
    w = xp.maximum(x, 0).astype(xp.float64)
    total = w.sum(axis=(1, 2))
    safe = xp.where(total > 0, total, 1.0)
    com = xp.stack([(w.sum(axis=1) * c).sum(axis=1), (w.sum(axis=2) * c).sum(axis=1)], axis=1)
    return shift_images(x, -com / safe[:, None])


def view_similarity(
    images: Any, pixel_size: float, resolution_A: float, psi_step_deg: float, mirrors: bool
) -> np.ndarray:
    """(K, K) float64: s_ij = max over in-plane angle (and mirror) of the normalised correlation
    of averages i and rotated j, band-limited to `resolution_A`; images (K, D, D), Å/px."""
    xp = xp_of(images)
    x = xp.asarray(images, dtype=xp.float32)
    D = x.shape[-1]
    r = D * pixel_size / resolution_A
    Dw = min(D, 2 * (math.ceil(r) + 2))
    if Dw < D:
        x = fourier_crop(x, Dw, ndim=2)
    mask = soft_circular_mask(Dw, MASK_RADIUS * Dw, MASK_EDGE * Dw, xp)
    x = _centre_on_mass(x * mask) * mask
    band = Band(Dw, min(r, Dw / 2 - 1))
    w = band.on(xp, "weight").astype(xp.float32)
    F = band.gather(rfft2c(x))
    Fw = F * w
    norm_F = xp.sqrt((Fw * xp.conj(F)).real.sum(axis=1))
    refs = xp.concatenate([x, _mirror_x(x)]) if mirrors else x
    psi = np.arange(0.0, 360.0, psi_step_deg)
    K, M = x.shape[0], refs.shape[0]
    best = xp.full((K, M), -xp.inf, dtype=xp.float64)
    step = batch_size_for(8 * 4 * psi.size * band.n, fraction=0.1, minimum=1, maximum=M)
    for s in range(0, M, step):
        R = rotate_2d(prepare_image(refs[s : s + step]), psi, band)  # (m, P, nF)
        norm_R = xp.sqrt(((R * xp.conj(R)).real * w).sum(axis=2))  # (m, P)
        corr = (Fw @ xp.conj(R.reshape(-1, band.n)).T).real.reshape(K, *norm_R.shape)
        ncc = corr / xp.maximum(norm_F[:, None, None] * norm_R[None], 1e-30)
        best[:, s : s + step] = ncc.max(axis=2)
    sim = best[:, :K]
    if mirrors:
        sim = xp.maximum(sim, best[:, K:])
    return to_host(sim)


def superclasses(sim: np.ndarray, n_groups: int, method: str) -> np.ndarray:
    """Agglomerative clustering of similarities (K, K) into at most n_groups: labels (K,) 1..G."""
    K = sim.shape[0]
    if K == 1:
        return np.ones(1, dtype=np.int64)
    dist = np.clip(1.0 - 0.5 * (sim + sim.T), 0.0, None)
    np.fill_diagonal(dist, 0.0)
    Z = linkage(squareform(dist, checks=False), method=method)
    return fcluster(Z, t=min(n_groups, K), criterion="maxclust").astype(np.int64)


def _cap(params: Params, n_input: int, sizes: np.ndarray) -> int | None:
    caps = []
    if params.max_particles_per_superclass is not None:
        caps.append(params.max_particles_per_superclass)
    if params.max_fraction_per_superclass is not None:
        cap = math.floor(params.max_fraction_per_superclass * n_input)
        if cap < 1:
            raise JobInputError(
                f"max_fraction_per_superclass: {params.max_fraction_per_superclass:g} of "
                f"{n_input} particles is less than one particle"
            )
        caps.append(cap)
    if params.rebalance_factor:
        caps.append(math.ceil(sizes[sizes > 0].min() / params.rebalance_factor))
    return min(caps) if caps else None


def run(params: Params, inputs: dict, ctx: JobContext) -> dict:
    particles: ParticleSet = inputs["particles"]
    averages_in: ClassAverages2D = inputs["class_averages"]
    averages = read_class_averages(averages_in, ctx.project_dir)
    tables = read_tables(particles, ctx.project_dir)
    if len(tables) == 0:
        raise JobInputError(f"{tables.source}: no particles to rebalance")
    numbers = averages.numbers
    cls = particle_classes(tables, numbers)
    counts = class_counts(cls, numbers)

    images = to_device(averages.images, get_xp())
    sim = view_similarity(images, averages_in.pixel_size, params.max_resolution_A,
                          params.psi_step_deg, params.mirrors)
    labels = superclasses(sim, params.num_superclasses, params.linkage)
    G = int(labels.max())
    group_counts = np.bincount(labels, weights=counts, minlength=G + 1)[1:]
    rank = np.empty(G, dtype=np.int64)
    rank[np.argsort(-group_counts, kind="stable")] = np.arange(1, G + 1)
    class_group = rank[labels - 1]  # (K,) superclass of each class, 1 = most particles
    order = np.argsort(numbers)
    group = class_group[order[np.searchsorted(numbers[order], cls)]]  # (N,) per particle
    before = np.bincount(group, minlength=G + 1)[1:]

    cap = _cap(params, len(group), before)
    keep = np.ones(len(group), dtype=bool)
    rng = ctx.rng()
    for g in range(1, G + 1):
        members = np.flatnonzero(group == g)
        if cap is not None and members.size > cap:
            keep[rng.choice(members, members.size - cap, replace=False)] = False
    after = np.bincount(group[keep], minlength=G + 1)[1:]
    for g in range(1, G + 1):
        ctx.log.info(f"superclass {g}: classes {numbers[class_group == g].tolist()}, "
                     f"{before[g - 1]} -> {after[g - 1]} particles")

    p = tables.particles.assign(cdagSuperclass=group)
    out = {
        name: write_particle_star(
            ctx, name, ParticleTables(tables.optics, p[m].reset_index(drop=True), tables.source),
            particles)
        for name, m in (("particles", keep), ("removed", ~keep))
    }
    ctx.metric("superclass_of_class", class_group.tolist())
    ctx.metric("superclass_sizes_before", before.tolist())
    ctx.metric("superclass_sizes_after", after.tolist())
    if cap is not None:
        ctx.metric("cap", cap)
    ctx.metric("kept_particles", int(keep.sum()))
    ctx.metric("removed_particles", int((~keep).sum()))
    res = averages.table.get("rlnEstimatedResolution")
    ctx.plot("superclasses", plots2d.class_montage(
        averages.images, numbers, counts, None if res is None else res.to_numpy(float),
        groups=class_group.tolist(), title=f"{len(numbers)} classes in {G} superclasses",
    ))
    ctx.plot("superclass_sizes", plots2d.group_sizes(before.tolist(), after.tolist(), cap),
             caption=f"kept {int(keep.sum())} of {len(keep)} particles")
    return out


JOB = JobType(
    name="rebalance_2d",
    params=Params,
    inputs={
        "particles": Slot(ParticleSet, requires=frozenset({"class"}),
                          help="2D-classified particles (rlnClassNumber)"),
        "class_averages": Slot(ClassAverages2D, help="The class averages of the same job"),
    },
    outputs={"particles": ParticleSet, "removed": ParticleSet},
    version=1,
    run=run,
    summary="Group 2D classes into views (superclasses) and cap the particles per group",
    passes={"particles": "particles", "removed": "particles"},
)
