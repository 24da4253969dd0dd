"""ParticleSet access for every job: batched memory-mapped image reads and streamed writes.

A ParticleSet's STAR is RELION 3.1 (data_optics + data_particles) with rlnImageName paths
relative to the project directory. Readers never load a whole stack: images come in
batches of (B, D, D) float32 read through memory maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from jobs.artifacts import ParticleSet, resolve
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.mrc import StackReader, StackWriter
from jobs.io.star import (
    OPTICS_CTF,
    PARTICLE_CTF,
    ParticleTables,
    parse_image_names,
    read_particles_star,
    write_particles_star,
)
from kernels.rotations import euler_to_matrix

#: Largest output stack file; bigger particle sets are split over several .mrcs files.
MAX_STACK_BYTES = 4 << 30

Batch = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]


def provides_of(tables: ParticleTables) -> frozenset[str]:
    """Capabilities ("ctf", "alignments2D", "alignments3D", "class", ...) the columns give."""
    p = set(tables.particles.columns)
    shifts = {"rlnOriginXAngst", "rlnOriginYAngst"}
    caps = {
        "ctf": set(PARTICLE_CTF) <= p and set(OPTICS_CTF) <= set(tables.optics.columns),
        "alignments2D": {"rlnAnglePsi", *shifts} <= p,
        "alignments3D": {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", *shifts} <= p,
        "class": "rlnClassNumber" in p,
        "coordinates": {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"} <= p,
        "latent": any(c.startswith("cdagLatent") for c in p),
    }
    return frozenset(k for k, v in caps.items() if v)


def read_tables(particle_set: ParticleSet, project_dir: Path) -> ParticleTables:
    """The particle set's STAR as `ParticleTables` (optics + particles)."""
    return read_particles_star(resolve(Path(project_dir), particle_set.star))


def image_locations(tables: ParticleTables, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(absolute stack path str (N,), 0-based index int64 (N,)) of each particle's image.

    Relative rlnImageName paths are taken relative to `root`.
    """
    index, paths = parse_image_names(tables)
    resolved = {p: str(resolve(root, p)) for p in dict.fromkeys(paths.tolist())}
    return np.asarray([resolved[p] for p in paths], dtype=object), index


def iter_batches(
    particle_set: ParticleSet,
    project_dir: Path,
    batch_size: int,
    columns: Sequence[str] = (),
) -> Iterator[Batch]:
    """Yield (indices int64 (B,), images float32 (B, D, D), {column: values (B,)}) in STAR order.

    `columns` may name particle or optics columns (optics values are given per particle).
    Images are read through memory maps; only one batch is held in memory.
    """
    tables = read_tables(particle_set, project_dir)
    paths, index = image_locations(tables, Path(project_dir))
    meta = {c: tables.column(c) for c in columns}
    with StackReader() as reader:
        for start in range(0, len(tables), batch_size):
            sl = slice(start, min(start + batch_size, len(tables)))
            images = reader.gather(paths[sl], index[sl])
            yield np.arange(sl.start, sl.stop), images, {c: v[sl] for c, v in meta.items()}


def _stack_sizes(count: int, box: int) -> list[int]:
    per = max(1, MAX_STACK_BYTES // (box * box * 4))
    return [min(per, count - s) for s in range(0, count, per)] or [0]


def _particle_set(
    ctx: JobContext, tables: ParticleTables, star: Path, stacks: list[str], box: int,
    pixel_size: float,
) -> ParticleSet:
    return ParticleSet(
        star=ctx.ref(star),
        stacks=stacks,
        count=len(tables),
        box=box,
        pixel_size=pixel_size,
        provides=provides_of(tables),
        summary={
            "particles": len(tables),
            "box": box,
            "pixel_size_A": pixel_size,
            "optics_groups": len(tables.optics),
        },
    )


def write_particle_set(
    ctx: JobContext,
    name: str,
    tables: ParticleTables,
    batches: Iterable[np.ndarray],
    box: int,
    pixel_size: float,
) -> ParticleSet:
    """Write `batches` (float32 (B, box, box), in particle order, len(tables) images in all)
    to `<name>.mrcs` stack(s) and `tables` to `<name>.star` in the job directory.

    rlnImageName is set to the new images (project-relative); a previous rlnImageName is kept
    as rlnImageOriginalName. Optics get rlnImageSize = box and rlnImagePixelSize = pixel_size.
    """
    sizes = _stack_sizes(len(tables), box)
    files = [ctx.path(f"{name}.mrcs" if len(sizes) == 1 else f"{name}_{k:03d}.mrcs")
             for k in range(len(sizes))]
    image_names: list[str] = []
    for f, n in zip(files, sizes, strict=True):
        ref = ctx.ref(f)
        image_names.extend(f"{i + 1:06d}@{ref}" for i in range(n))
    k, writer = 0, StackWriter(files[0], sizes[0], box, pixel_size)
    try:
        for batch in batches:
            pos = 0
            while pos < len(batch):
                if writer.written == writer.n:
                    writer.close()
                    k += 1
                    if k == len(files):
                        raise ValueError(f"{name}: more images than the {len(tables)} particles")
                    writer = StackWriter(files[k], sizes[k], box, pixel_size)
                take = min(len(batch) - pos, writer.n - writer.written)
                writer.write(batch[pos : pos + take])
                pos += take
    finally:
        writer.close()
    if k != len(files) - 1 or writer.written != writer.n:
        raise ValueError(f"{name}: fewer images than the {len(tables)} particles")

    particles = tables.particles
    if "rlnImageName" in particles and "rlnImageOriginalName" not in particles:
        particles = particles.rename(columns={"rlnImageName": "rlnImageOriginalName"})
    particles = particles.drop(columns=["rlnImageName"], errors="ignore")
    particles.insert(0, "rlnImageName", image_names)
    optics = tables.optics.assign(rlnImageSize=box, rlnImagePixelSize=pixel_size,
                                  rlnImageDimensionality=2)
    out = ParticleTables(optics=optics, particles=particles, source=ctx.path(f"{name}.star"))
    write_particles_star(out.source, out)
    return _particle_set(ctx, out, out.source, [ctx.ref(f) for f in files], box, pixel_size)


def write_particle_star(
    ctx: JobContext, name: str, tables: ParticleTables, source: ParticleSet
) -> ParticleSet:
    """Write new metadata for the images of `source` (same rlnImageName, same stacks) to
    `<name>.star`; for jobs that change columns (poses, classes, subsets), not images."""
    star = ctx.path(f"{name}.star")
    out = ParticleTables(optics=tables.optics, particles=tables.particles, source=star)
    write_particles_star(star, out)
    return _particle_set(ctx, out, star, list(source.stacks), source.box, source.pixel_size)


#: RELION columns of a 3D alignment.
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def poses_3d(tables: ParticleTables, a: float) -> tuple[np.ndarray, np.ndarray]:
    """R (N, 3, 3) and shifts t (N, 2) px at pixel size a (RELION origin = -t x pixel size);
    JobInputError when the particles have no 3D alignment."""
    missing = [c for c in POSE_COLUMNS if not tables.has(c)]
    if missing:
        raise JobInputError(f"{tables.source}: particles lack 3D alignments ({', '.join(missing)}); "
                            "run a consensus refinement first")
    rot, tilt, psi, ox, oy = (tables.numeric(c) for c in POSE_COLUMNS)
    return euler_to_matrix(rot, tilt, psi), -np.stack([ox, oy], axis=1) / a


def random_subsets(tables: ParticleTables, redo: bool, redo_param: str) -> np.ndarray | None:
    """Half set (N,) in {0, 1} from rlnRandomSubset (1/2), or None (the engine splits) when
    ``redo`` or the column is absent; JobInputError for other values or a one-sided split
    (naming ``redo_param``, the option that ignores the column)."""
    if redo or not tables.has("rlnRandomSubset"):
        return None
    s = tables.numeric("rlnRandomSubset").astype(np.int64)
    bad = np.flatnonzero((s != 1) & (s != 2))
    if bad.size:
        raise JobInputError(f"{tables.row(int(bad[0]))}: rlnRandomSubset must be 1 or 2")
    if np.unique(s).size < 2:
        raise JobInputError(f"{tables.source}: rlnRandomSubset puts every particle in one half; set {redo_param}")
    return s - 1
