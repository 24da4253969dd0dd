"""Class averages on disk (ClassAverages2D): an MRC stack + a `data_model_classes` STAR table.

Shared by the 2D classification family (class_2d, select_2d, rebalance_2d).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from jobs.artifacts import ClassAverages2D, resolve
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.mrc import StackReader, StackWriter
from jobs.io.star import ParticleTables, read_star, write_star
from jobs.particles import image_locations

CLASS_BLOCK = "model_classes"


@dataclass(frozen=True)
class ClassAverages:
    """A ClassAverages2D read into memory: table rows (STAR order) and images (K, D, D) float32."""

    table: pd.DataFrame
    images: np.ndarray
    source: Path

    @property
    def numbers(self) -> np.ndarray:
        return self.table["rlnClassNumber"].to_numpy(dtype=np.int64)


def read_class_averages(averages: ClassAverages2D, project_dir: Path) -> ClassAverages:
    """Table `data_model_classes` and images (via rlnReferenceImage "k@path") of `averages`."""
    path = resolve(Path(project_dir), averages.star)
    blocks = read_star(path)
    if CLASS_BLOCK not in blocks:
        raise JobInputError(f"{path}: no data_{CLASS_BLOCK} table")
    table = blocks[CLASS_BLOCK].reset_index(drop=True)
    for col in ("rlnReferenceImage", "rlnClassNumber"):
        if col not in table:
            raise JobInputError(f"{path}: data_{CLASS_BLOCK} lacks {col}")
    numbers = pd.to_numeric(table["rlnClassNumber"], errors="coerce")
    bad = ~(numbers.notna() & (numbers >= 1) & (numbers == numbers.round())).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JobInputError(f"{path}, row {i + 1}: rlnClassNumber {table['rlnClassNumber'][i]!r}")
    table["rlnClassNumber"] = numbers.astype(np.int64)
    dup = table["rlnClassNumber"].duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise JobInputError(f"{path}, row {i + 1}: class {table['rlnClassNumber'][i]} repeated")
    refs = ParticleTables(
        optics=pd.DataFrame(),
        particles=pd.DataFrame({"rlnImageName": table["rlnReferenceImage"].astype(str)}),
        source=path,
    )
    paths, index = image_locations(refs, Path(project_dir))
    with StackReader() as reader:
        images = reader.gather(paths, index)
    return ClassAverages(table=table, images=images, source=path)


def write_class_averages(
    ctx: JobContext, name: str, table: pd.DataFrame, images: np.ndarray, pixel_size: float
) -> ClassAverages2D:
    """Write `images` (K, D, D) to `<name>.mrcs` and `table` (K rows, same order, with
    rlnClassNumber) to `<name>.star` (data_model_classes); rlnReferenceImage is set."""
    K, D = images.shape[0], images.shape[-1]
    stack = ctx.path(f"{name}.mrcs")
    with StackWriter(stack, K, D, pixel_size) as writer:
        writer.write(images)
    ref = ctx.ref(stack)
    out = table.drop(columns=["rlnReferenceImage"], errors="ignore")
    out.insert(0, "rlnReferenceImage", [f"{k + 1:06d}@{ref}" for k in range(K)])
    star = ctx.path(f"{name}.star")
    write_star(star, {CLASS_BLOCK: out})
    return ClassAverages2D(
        stack=ref, star=ctx.ref(star), num_classes=K, box=D, pixel_size=pixel_size,
        summary={"classes": K, "box": D, "pixel_size_A": pixel_size},
    )


def particle_classes(tables: ParticleTables, numbers: np.ndarray) -> np.ndarray:
    """Each particle's rlnClassNumber (N,) int64, checked to be one of the classes `numbers`."""
    if "rlnClassNumber" not in tables.particles:
        raise JobInputError(f"{tables.source}: no rlnClassNumber column (not 2D-classified)")
    cls = pd.to_numeric(tables.particles["rlnClassNumber"], errors="coerce").to_numpy()
    bad = ~np.isin(cls, numbers)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JobInputError(
            f"{tables.row(i)}: rlnClassNumber {tables.particles['rlnClassNumber'][i]} is not one of "
            f"the {len(numbers)} class averages (particles and classes from different jobs?)"
        )
    return cls.astype(np.int64)


def class_counts(cls: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """Hard count of particles per class, in the order of `numbers` (K,) int64."""
    return pd.Series(cls).value_counts().reindex(numbers, fill_value=0).to_numpy(np.int64)
