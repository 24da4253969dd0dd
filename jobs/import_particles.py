"""import_particles (particle mode): RELION STAR / cryoSPARC .cs + MRC stacks -> ParticleSet.

algorithms.md §2. Everything cheap is checked before any output is written (columns,
optics values, stack files, indices, box sizes, pixel sizes from the MRC headers); NaN/Inf
pixels are checked per batch while streaming. Each error is a JobInputError naming the
file and the STAR/.cs row (1-based). Images are streamed: read through memory maps,
optionally contrast-inverted, Fourier-cropped to `box_crop`, then normalised (background
outside a circle: mean 0, std 1), and written to float32 stacks batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
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

    source: Literal["star", "cs", "demo"] = Field(
        "star", description="star: RELION STAR; cs: cryoSPARC .cs; demo: simulated demo dataset"
    )
    star_path: str | None = Field(None, description="RELION particle STAR (source star)")
    cs_path: str | None = Field(None, description="cryoSPARC particle .cs (source cs)")
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
        wanted = {"star": "star_path", "cs": "cs_path"}.get(self.source)
        for field in ("star_path", "cs_path"):
            given = getattr(self, field) is not None
            if field == wanted and not given:
                raise ValueError(f"source '{self.source}' needs {field}")
            if field != wanted and given:
                raise ValueError(f"{field} is not used with source '{self.source}'")
        if self.box_crop is not None and self.box_crop % 2:
            raise ValueError(f"box_crop must be even, got {self.box_crop}")
        return self


@dataclass(frozen=True)
class _Plan:
    """What the validated input looks like: per-particle image locations, sizes, pixel sizes."""

    paths: np.ndarray  # (N,) absolute stack path (str)
    index: np.ndarray  # (N,) 0-based image index
    box: int
    pixel_size: float  # Å/px of the input images
    out_box: int
    out_pixel_size: float


def _read_source(params: Params, ctx: JobContext) -> tuple[ParticleTables, Path]:
    """Metadata of the chosen source and the directory its image paths are relative to."""
    defaults = OpticsDefaults(
        pixel_size_A=params.pixel_size_A,
        voltage_kv=params.voltage_kv,
        cs_mm=params.cs_mm,
        amplitude_contrast=params.amplitude_contrast,
    )
    if params.source == "demo":
        from jobs.simulated_dataset import write_preset

        info = write_preset("demo", ctx.work_dir / "demo_source", params.seed)
        path = Path(info["particles_star"])
        tables = read_particles_star(path, defaults)
    elif params.source == "cs":
        path = ctx.resolve(params.cs_path or "")
        tables = read_particles_cs(path, defaults)
    else:
        path = ctx.resolve(params.star_path or "")
        tables = read_particles_star(path, defaults)
    root = ctx.resolve(params.root) if params.root else path.parent
    return tables, root


def _check_values(tables: ParticleTables) -> None:
    """CTF columns present and finite in every row; one pixel size for all optics groups."""
    for col in PARTICLE_CTF:
        if col not in tables.particles:
            raise JobInputError(f"{tables.source}: missing CTF column {col}")
    for col in (*PARTICLE_CTF, *OPTICS_CTF, "rlnImagePixelSize"):
        values = pd.to_numeric(pd.Series(tables.column(col)), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise JobInputError(f"{tables.row(i)}: {col} is missing or not a finite number")
    pixel = tables.column("rlnImagePixelSize").astype(float)
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


def _plan(tables: ParticleTables, root: Path, params: Params) -> _Plan:
    """Validate metadata and stacks (headers only) before anything is written."""
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
    out_box = params.box_crop or box
    if out_box > box:
        raise JobInputError(f"box_crop {out_box} is larger than the particle box {box}")
    return _Plan(
        paths=paths,
        index=index,
        box=box,
        pixel_size=float(pixel[0]),
        out_box=out_box,
        out_pixel_size=float(pixel[0]) * box / out_box,
    )


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
    tables: ParticleTables, plan: _Plan, params: Params, ctx: JobContext, first: list[np.ndarray]
) -> Iterator[np.ndarray]:
    """Stream processed batches (float32 (B, out_box, out_box)) in particle order.

    The first batch's images are also appended to `first` (for the montage).
    """
    xp = get_xp()
    background = None
    if params.normalize:
        background = to_device(
            background_mask(plan.out_box, plan.out_pixel_size, params.norm_diameter_A), xp
        )
    n = len(tables)
    with StackReader() as reader:
        for start in range(0, n, params.batch_size):
            ctx.check_cancelled()
            stop = min(start + params.batch_size, n)
            raw = reader.gather(plan.paths[start:stop], plan.index[start:stop])
            bad = ~np.isfinite(raw).all(axis=(1, 2))
            if bad.any():
                i = start + int(np.flatnonzero(bad)[0])
                raise JobInputError(
                    f"{plan.paths[i]}, image {plan.index[i] + 1} ({tables.row(i)}): "
                    "NaN or Inf pixels"
                )
            x = to_device(raw, xp)
            if params.invert_contrast:
                x = -x
            if plan.out_box != plan.box:
                x = fourier_crop(x, plan.out_box, ndim=2)
            if background is not None:
                x, std = normalize_background(x, background)
                flat = to_host(std) == 0
                if flat.any():
                    i = start + int(np.flatnonzero(flat)[0])
                    raise JobInputError(
                        f"{plan.paths[i]}, image {plan.index[i] + 1} ({tables.row(i)}): "
                        "constant background, cannot normalise"
                    )
            out = to_host(x).astype(np.float32, copy=False)
            if not first:
                first.append(out[:16].copy())
            ctx.progress("import", stop, n)
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
    tables, root = _read_source(params, ctx)
    plan = _plan(tables, root, params)
    p = tables.particles
    if "rlnAnglePsi" in p:
        for col in ("rlnOriginXAngst", "rlnOriginYAngst"):
            if col not in p:
                p[col] = 0.0
    ctx.log.info(
        f"importing {len(tables)} particles from {tables.source}: box {plan.box} px, "
        f"{plan.pixel_size:g} Å/px -> box {plan.out_box} px, {plan.out_pixel_size:g} Å/px"
    )
    first: list[np.ndarray] = []
    particles = write_particle_set(
        ctx, "particles", tables, _images(tables, plan, params, ctx, first),
        plan.out_box, plan.out_pixel_size,
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
    version=1,
    run=run,
    summary="Import RELION STAR / cryoSPARC .cs particles and their MRC stacks as a ParticleSet",
    adds={"particles": frozenset({"ctf"})},
)
