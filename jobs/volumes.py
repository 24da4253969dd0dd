"""Maps on disk (VolumeSet): MRC files with voxel size, optional half maps and an FSC table.

Shared by the 3D jobs (ab_initio, hetero_refine, homo_refine, class_3d). FSC tables are
STAR `data_fsc` blocks with RELION's columns (rlnSpectralIndex, rlnResolution (1/Å),
rlnAngstromResolution, rlnFourierShellCorrelation), plus any further curves a job adds under
RELION postprocess names (rlnFourierShellCorrelationUnmaskedMaps, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from jobs.artifacts import Mask, Volume, VolumeSet, resolve
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.mrc import write_mrc
from jobs.io.star import write_star
from kernels.fourier import fourier_crop, fourier_pad


@dataclass(frozen=True)
class MapOut:
    """One map to write: map (D, D, D), optional half maps, FSC curve (D//2,), further FSC curves
    by STAR column name (written in the same table) and a mask (D, D, D) at pixel_size."""

    map: np.ndarray
    half_a: np.ndarray | None = None
    half_b: np.ndarray | None = None
    fsc: np.ndarray | None = None
    resolution_A: float | None = None
    fsc_extra: dict[str, np.ndarray] | None = None
    mask: np.ndarray | None = None


def fsc_table(curve: np.ndarray, box: int, pixel_size: float,
              extra: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """RELION-style FSC table for a curve over shells 0 .. len-1 of a box at pixel_size Å, with
    ``extra`` curves of the same length as further columns."""
    r = np.arange(len(curve))
    inv = r / (box * pixel_size)
    columns = {"rlnSpectralIndex": r, "rlnResolution": inv,
               "rlnAngstromResolution": np.where(r > 0, 1.0 / np.maximum(inv, 1e-30), 999.0),
               "rlnFourierShellCorrelation": np.asarray(curve, dtype=np.float64)}
    for name, c in (extra or {}).items():
        columns[name] = np.asarray(c, dtype=np.float64)
    return pd.DataFrame(columns)


def write_volume_set(ctx: JobContext, name: str, maps: list[MapOut], pixel_size: float) -> VolumeSet:
    """Write maps as `<name>_NNN.mrc` (+ `_half_a/_half_b/_mask.mrc`, `_fsc.star`) -> VolumeSet."""
    vols = []
    box = int(maps[0].map.shape[-1])
    for k, m in enumerate(maps, start=1):
        stem = f"{name}_{k:03d}"
        refs: dict[str, str | float | None] = {"resolution_A": m.resolution_A}
        for key, data in (("map", m.map), ("half_a", m.half_a), ("half_b", m.half_b), ("mask", m.mask)):
            if data is not None:
                path = ctx.path(f"{stem}.mrc" if key == "map" else f"{stem}_{key}.mrc")
                write_mrc(path, data, pixel_size)
                refs[key] = ctx.ref(path)
        if m.fsc is not None:
            path = ctx.path(f"{stem}_fsc.star")
            write_star(path, {"fsc": fsc_table(m.fsc, box, pixel_size, m.fsc_extra)})
            refs["fsc"] = ctx.ref(path)
        vols.append(Volume(**refs))
    return VolumeSet(volumes=vols, box=box, pixel_size=pixel_size)


def read_map(path: Path, what: str = "map") -> np.ndarray:
    """One cubic map (D, D, D) float32 from an MRC file; JobInputError naming ``what`` and the
    file when it cannot be read or is not a cube."""
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise JobInputError(f"{what} {path}: cannot read ({exc})") from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise JobInputError(f"{what} {path}: expected a cubic map, got shape {data.shape}")
    return data


def read_maps(vs: VolumeSet, project_dir: Path) -> list[np.ndarray]:
    """The full maps of a VolumeSet (D, D, D) float32, in order."""
    return [read_map(resolve(project_dir, v.map)) for v in vs.volumes]


def resample(vol: np.ndarray, pixel_size: float, D: int, target_pixel: float, what: str) -> np.ndarray:
    """A map (B, B, B) at pixel_size Å brought to box D at target_pixel Å by Fourier cropping
    or padding; the physical box sizes must agree within 1%."""
    B = vol.shape[-1]
    if abs(B * pixel_size - D * target_pixel) > 0.01 * D * target_pixel:
        raise JobInputError(f"{what}: box {B} x {pixel_size:.4g} Å does not match the particles' "
                            f"{D} x {target_pixel:.4g} Å")
    if B == D:
        return vol
    return fourier_crop(vol, D, ndim=3) if D < B else fourier_pad(vol, D, ndim=3)


def maps_at(vs: VolumeSet | None, ctx: JobContext, D: int, a: float, what: str) -> list[np.ndarray] | None:
    """The maps of a VolumeSet (None passes through) resampled to box D at a Å/px."""
    if vs is None:
        return None
    return [resample(m, vs.pixel_size, D, a, f"{what} map {k + 1}")
            for k, m in enumerate(read_maps(vs, ctx.project_dir))]


def read_mask(m: Mask | None, ctx: JobContext, D: int, a: float, what: str = "mask") -> np.ndarray | None:
    """A mask input (None passes through) at box D, a Å/px, clipped to [0, 1]; JobInputError
    naming ``what`` and the file when it cannot be read or is not a finite cube."""
    if m is None:
        return None
    path = ctx.resolve(m.map)
    data = read_map(path, what)
    if not np.isfinite(data).all():
        raise JobInputError(f"{what} {path}: has non-finite values")
    return np.clip(resample(data, m.pixel_size, D, a, what), 0.0, 1.0)
