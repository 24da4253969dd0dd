"""import_particles: RELION STAR / cryoSPARC .cs + MRC stacks, or micrographs + coordinates
(extraction, jobs.extraction) -> ParticleSet.

algorithms.md §2. Everything cheap is checked before any output is written (columns,
optics values, stack or micrograph files, indices, coordinates, box sizes, pixel sizes from
the MRC headers); NaN/Inf pixels are checked per batch while streaming. Each error is a
JobInputError naming the file and the STAR/.cs row (1-based). Images are streamed: read
through memory maps (stacks, or one micrograph at a time), optionally contrast-inverted,
Fourier-cropped to `box_crop`, then normalised (background outside a circle: mean 0, std 1),
and written to float32 stacks batch by batch. The demo source simulates the `demo` preset
(jobs.simulated_dataset) into the job directory and extracts it from its micrographs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from jobs.artifacts import ParticleSet
from jobs.base import JobParams, JobType
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.extraction import iter_boxes, plan_extraction, read_coordinates, read_micrographs
from jobs.io.cs import read_particles_cs
from jobs.io.mrc import StackHeader, StackReader, read_stack_header
from jobs.io.star import (
    OPTICS_CTF,
    PARTICLE_CTF,
    OpticsDefaults,
    ParticleTables,
    read_particles_star,
)
from jobs.particles import image_locations, write_particle_set
from kernels.backend import get_xp, to_device, to_host, xp_of
from kernels.fourier import fourier_crop, soft_circular_mask

#: Relative tolerance between the STAR/.cs pixel size and an MRC header's voxel size.
PIXEL_SIZE_RTOL = 1e-3
#: Default normalisation circle diameter as a fraction of the (output) box.
NORM_DIAMETER_FRACTION = 0.75


class Params(JobParams):
    """Particle import. Paths are absolute or relative to the project directory."""

    source: Literal["star", "cs", "micrographs", "demo"] = Field(
        "star",
        description="star: RELION STAR; cs: cryoSPARC .cs; micrographs: extract from "
        "micrographs; demo: simulate the demo dataset and extract it from its micrographs",
    )
    star_path: str | None = Field(None, description="RELION particle STAR (source star)")
    cs_path: str | None = Field(None, description="cryoSPARC particle .cs (source cs)")
    micrographs_star: str | None = Field(
        None, description="Micrographs STAR with per-micrograph CTF (source micrographs)"
    )
    coords: str | None = Field(
        None,
        description="Coordinate STAR files (a glob, <micrograph stem>_<suffix>.star) or a "
        "particles STAR with rlnMicrographName/rlnCoordinateX/Y (source micrographs)",
    )
    extract_box: int | None = Field(
        None, ge=8, description="Extraction box, px at the micrograph pixel size (source "
        "micrographs; demo: the simulated box by default)"
    )
    root: str | None = Field(
        None, description="Directory image paths are relative to (default: the metadata file's)"
    )
    pixel_size_A: float | None = Field(
        None, gt=0, description="Used where the metadata has none"
    )
    voltage_kv: float | None = Field(None, gt=0, description="Used where the metadata has none")
    cs_mm: float | None = Field(None, ge=0, description="Used where the metadata has none")
    amplitude_contrast: float | None = Field(
        None, ge=0, lt=1, description="Used where the metadata has none"
    )
    invert_contrast: bool = Field(False, description="Multiply images by -1 (dark to white)")
    normalize: bool = Field(True, description="Background (outside a circle) mean 0, std 1")
    norm_diameter_A: float | None = Field(
        None, gt=0, description="Normalisation circle diameter (default 0.75 * box)"
    )
    box_crop: int | None = Field(None, ge=8, description="Fourier-crop to this even box (px)")
    batch_size: int = Field(1000, ge=1, le=100_000, description="Images per streamed batch")

    @model_validator(mode="after")
    def _check(self) -> Params:
        needs = {"star": ("star_path",), "cs": ("cs_path",),
                 "micrographs": ("micrographs_star", "coords", "extract_box")}
        allowed = {**needs, "demo": ("extract_box",)}[self.source]
        for field in ("star_path", "cs_path", "micrographs_star", "coords", "extract_box"):
            given = getattr(self, field) is not None
            if field in needs.get(self.source, ()) and not given:
                raise ValueError(f"source '{self.source}' needs {field}")
            if field not in allowed and given:
                raise ValueError(f"{field} is not used with source '{self.source}'")
        for field in ("box_crop", "extract_box"):
            value = getattr(self, field)
            if value is not None and value % 2:
                raise ValueError(f"{field} must be even, got {value}")
        return self


@dataclass(frozen=True)
class _Source:
    """Validated input: output metadata, raw image batches and a message label per particle."""

    tables: ParticleTables
    box: int
    pixel_size: float  # Å/px of the input images
    batches: Callable[[], Iterator[tuple[int, np.ndarray]]]  # (first row, float32 (B, box, box))
    where: Callable[[int], str]  # particle row (0-based) -> '<image>, (<file>, row k)'


def _defaults(params: Params) -> OpticsDefaults:
    return OpticsDefaults(
        pixel_size_A=params.pixel_size_A,
        voltage_kv=params.voltage_kv,
        cs_mm=params.cs_mm,
        amplitude_contrast=params.amplitude_contrast,
    )


def _stack_source(params: Params, ctx: JobContext) -> _Source:
    """Particle mode: metadata (STAR or .cs) and stacks, validated (headers only)."""
    if params.source == "cs":
        path = ctx.resolve(params.cs_path or "")
        tables = read_particles_cs(path, _defaults(params))
    else:
        path = ctx.resolve(params.star_path or "")
        tables = read_particles_star(path, _defaults(params))
    root = ctx.resolve(params.root) if params.root else path.parent
    paths, index, box, pixel_size = _plan(tables, root)

    def batches() -> Iterator[tuple[int, np.ndarray]]:
        with StackReader() as reader:
            for start in range(0, len(tables), params.batch_size):
                stop = min(start + params.batch_size, len(tables))
                yield start, reader.gather(paths[start:stop], index[start:stop])

    return _Source(tables, box, pixel_size, batches,
                   lambda i: f"{paths[i]}, image {index[i] + 1} ({tables.row(i)})")


def _micrograph_source(params: Params, ctx: JobContext) -> _Source:
    """Micrograph mode (and demo): micrographs, coordinates and CTF, validated (headers only)."""
    if params.source == "demo":
        from jobs.simulated_dataset import write_preset

        info = write_preset("demo", ctx.work_dir / "demo_source", params.seed)
        star, root = Path(info["micrographs_star"]), Path(info["out_dir"])
        coords = str(root / "Micrographs" / "*_pick.star")
        box = params.extract_box or int(info["box"])
    else:
        star = ctx.resolve(params.micrographs_star or "")
        root = ctx.resolve(params.root) if params.root else star.parent
        coords, box = params.coords or "", params.extract_box or 0
    mics = read_micrographs(star, root, _defaults(params))
    ex = plan_extraction(mics, *read_coordinates(coords, ctx.project_dir, mics), box)
    ctx.metric("skipped_at_edge", ex.skipped)
    if ex.skipped:
        ctx.log.warning(f"skipped {ex.skipped} particles whose {box} px box crosses the edge "
                        "of its micrograph")
    if len(ex.tables) == 0:
        raise JobInputError(f"{coords}: no particle box lies inside its micrograph "
                            f"(extract_box {box} px, {ex.skipped} skipped at the edge)")
    ctx.metric("micrographs", ex.picked_micrographs)
    return _Source(ex.tables, box, ex.pixel_size, lambda: iter_boxes(ex, params.batch_size),
                   lambda i: f"{ex.files[ex.mic[i]]} ({ex.labels[i]})")


def _check_values(tables: ParticleTables) -> None:
    """CTF columns present and finite in every row; one pixel size for all optics groups."""
    for col in PARTICLE_CTF:
        if col not in tables.particles:
            raise JobInputError(f"{tables.source}: missing CTF column {col}")
    for col in (*PARTICLE_CTF, *OPTICS_CTF):
        tables.numeric(col)
    pixel = tables.numeric("rlnImagePixelSize")
    if not np.allclose(pixel, pixel[0], rtol=PIXEL_SIZE_RTOL, atol=0):
        i = int(np.flatnonzero(~np.isclose(pixel, pixel[0], rtol=PIXEL_SIZE_RTOL, atol=0))[0])
        raise JobInputError(
            f"{tables.row(i)}: pixel size {pixel[i]:g} Å differs from row 1's {pixel[0]:g} Å "
            "(one ParticleSet has one pixel size)"
        )


def _read_headers(
    tables: ParticleTables, paths: np.ndarray, stack_id: np.ndarray, stacks: np.ndarray
) -> list[StackHeader]:
    first_row = pd.Series(np.arange(len(paths))).groupby(stack_id).first().to_numpy()
    headers = []
    for s, path in enumerate(stacks):
        try:
            headers.append(read_stack_header(Path(path)))
        except JobInputError as exc:
            raise JobInputError(f"{tables.row(int(first_row[s]))}: {exc}") from exc
    return headers


def _plan(tables: ParticleTables, root: Path) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Validate metadata and stacks (headers only) before anything is written.

    Returns each particle's stack path (N,) and 0-based index (N,), the box and pixel size.
    """
    if len(tables) == 0:
        raise JobInputError(f"{tables.source}: no particles")
    _check_values(tables)
    paths, index = image_locations(tables, root)
    stack_id, stacks = pd.factorize(pd.Series(paths))
    headers = _read_headers(tables, paths, stack_id, np.asarray(stacks))

    count = np.array([h.n for h in headers])
    past = index >= count[stack_id]
    if past.any():
        i = int(np.flatnonzero(past)[0])
        h = headers[stack_id[i]]
        raise JobInputError(
            f"{tables.row(i)}: image {index[i] + 1} is past the end of {h.path} ({h.n} images)"
        )
    for h in headers:
        if h.nx != h.ny:
            raise JobInputError(f"{h.path}: images are {h.nx} x {h.ny}, not square")
    boxes = np.array([h.nx for h in headers])
    box = int(boxes[stack_id[0]])
    if (boxes != box).any():
        other = headers[int(np.flatnonzero(boxes != box)[0])]
        raise JobInputError(
            f"mixed box sizes: {other.path} has {other.nx} px images, {headers[stack_id[0]].path} "
            f"(row 1) has {box} px"
        )
    if "rlnImageSize" in tables.optics:
        sizes = tables.column("rlnImageSize")
        bad = pd.to_numeric(pd.Series(sizes), errors="coerce").to_numpy() != box
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise JobInputError(
                f"{tables.row(i)}: rlnImageSize {sizes[i]} but the stack has {box} px images"
            )
    if box % 2:
        raise JobInputError(f"{headers[0].path}: odd box size {box} (even boxes only)")

    pixel = tables.column("rlnImagePixelSize").astype(float)
    for s, h in enumerate(headers):
        rows = np.flatnonzero(stack_id == s)
        if h.voxel_size_A > 0 and not np.isclose(
            h.voxel_size_A, pixel[rows[0]], rtol=PIXEL_SIZE_RTOL, atol=0
        ):
            raise JobInputError(
                f"{tables.row(int(rows[0]))}: pixel size {pixel[rows[0]]:g} Å in the metadata but "
                f"{h.voxel_size_A:g} Å in the header of {h.path}"
            )
    return paths, index, box, float(pixel[0])


def background_mask(box: int, pixel_size: float, diameter_A: float | None) -> np.ndarray:
    """(box, box) float32: 1 outside the normalisation circle, 0 inside (hard edge)."""
    radius = (diameter_A / pixel_size if diameter_A else NORM_DIAMETER_FRACTION * box) / 2
    background = 1.0 - soft_circular_mask(box, radius, 0.0)
    if background.sum() < box:
        raise JobInputError(
            f"norm_diameter_A {diameter_A} leaves fewer than {box} background pixels in a "
            f"{box} px box of {pixel_size:g} Å/px"
        )
    return background.astype(np.float32)


def normalize_background(images: Any, background: Any) -> tuple[Any, Any]:
    """Scale images (B, D, D) so pixels where background == 1 have mean 0 and std 1.

    Returns (normalised images, background std before normalisation (B,)).
    """
    xp = xp_of(images)
    w = xp.asarray(background, dtype=images.dtype)
    n = float(w.sum())
    mean = xp.tensordot(images, w, axes=2) / n
    centred = images - mean[:, None, None]
    std = xp.sqrt(xp.tensordot(centred * centred, w, axes=2) / n)
    return centred / xp.where(std > 0, std, 1)[:, None, None], std


def _images(
    source: _Source, params: Params, out_box: int, out_pixel_size: float, ctx: JobContext,
    first: list[np.ndarray],
) -> Iterator[np.ndarray]:
    """Stream processed batches (float32 (B, out_box, out_box)) in particle order.

    The first batch's images are also appended to `first` (for the montage).
    """
    xp = get_xp()
    background = None
    if params.normalize:
        background = to_device(
            background_mask(out_box, out_pixel_size, params.norm_diameter_A), xp
        )
    n = len(source.tables)
    for start, raw in source.batches():
        ctx.check_cancelled()
        bad = ~np.isfinite(raw).all(axis=(1, 2))
        if bad.any():
            raise JobInputError(
                f"{source.where(start + int(np.flatnonzero(bad)[0]))}: NaN or Inf pixels"
            )
        x = to_device(raw, xp)
        if params.invert_contrast:
            x = -x
        if out_box != source.box:
            x = fourier_crop(x, out_box, ndim=2)
        if background is not None:
            x, std = normalize_background(x, background)
            flat = to_host(std) == 0
            if flat.any():
                raise JobInputError(
                    f"{source.where(start + int(np.flatnonzero(flat)[0]))}: "
                    "constant background, cannot normalise"
                )
        out = to_host(x).astype(np.float32, copy=False)
        if not first:
            first.append(out[:16].copy())
        ctx.progress("import", start + len(out), n)
        yield out


def _montage(ctx: JobContext, images: np.ndarray) -> None:
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.6), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img in zip(axes.ravel(), images, strict=False):
        ax.imshow(img, cmap="gray")
    ctx.plot("particles", fig, caption=f"First {len(images)} imported particles")


def run(params: Params, inputs: dict, ctx: JobContext) -> dict[str, ParticleSet]:
    stacks = params.source in ("star", "cs")
    source = _stack_source(params, ctx) if stacks else _micrograph_source(params, ctx)
    tables = source.tables
    out_box = params.box_crop or source.box
    if out_box > source.box:
        raise JobInputError(f"box_crop {out_box} is larger than the particle box {source.box}")
    out_pixel_size = source.pixel_size * source.box / out_box
    p = tables.particles
    if "rlnAnglePsi" in p:
        for col in ("rlnOriginXAngst", "rlnOriginYAngst"):
            if col not in p:
                p[col] = 0.0
    ctx.log.info(
        f"importing {len(tables)} particles from {tables.source}: box {source.box} px, "
        f"{source.pixel_size:g} Å/px -> box {out_box} px, {out_pixel_size:g} Å/px"
    )
    first: list[np.ndarray] = []
    particles = write_particle_set(
        ctx, "particles", tables, _images(source, params, out_box, out_pixel_size, ctx, first),
        out_box, out_pixel_size,
    )
    ctx.metric("particles", len(tables))
    if first:
        _montage(ctx, first[0])
    return {"particles": particles}


JOB = JobType(
    name="import_particles",
    params=Params,
    inputs={},
    outputs={"particles": ParticleSet},
    version=4,  # 4: the demo source's design (session 22)
    run=run,
    summary="Import RELION STAR / cryoSPARC .cs particles and their MRC stacks, or extract "
    "particles from micrographs with coordinates and CTF, as a ParticleSet",
    adds={"particles": frozenset({"ctf", "coordinates"})},
)
