"""Particle extraction from motion-corrected micrographs (import_particles, micrograph mode).

Inputs: a RELION 3.1 micrographs STAR (data_optics + data_micrographs: rlnMicrographName and
per-micrograph CTF) and coordinates, either RELION coordinate STAR files (a glob; each file
belongs to the micrograph whose name stem it starts with, as `<stem>_<suffix>.star`) or one
particles STAR with rlnMicrographName / rlnCoordinateX / rlnCoordinateY.

Coordinates are micrograph pixels; a box of D px has its centre (index D//2) at the rounded
coordinate: rows y - D//2 .. y + D//2 - 1 (RELION's windowing). A coordinate outside the
micrograph is an input error; a box that crosses the micrograph edge is skipped and counted.
Everything is checked (headers only) before any box is cut; boxes are then cut micrograph by
micrograph from memory maps, in micrograph order (the order of the micrographs STAR).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from jobs.errors import JobInputError
from jobs.io.mrc import read_stack_header
from jobs.io.star import (
    OPTICS_CTF,
    PARTICLE_CTF,
    OpticsDefaults,
    ParticleTables,
    complete_optics,
    read_star,
)

#: Per-micrograph CTF columns copied to each particle (the first three are required).
MICROGRAPH_CTF = (*PARTICLE_CTF, "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor",
                  "rlnCtfMaxResolution", "rlnCtfFigureOfMerit")
COORDS = ("rlnCoordinateX", "rlnCoordinateY")
#: Relative tolerance between the STAR pixel size and a micrograph header's voxel size.
PIXEL_SIZE_RTOL = 1e-3
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Micrographs:
    """A micrographs STAR: optics, one row per micrograph, and each micrograph's file."""

    optics: pd.DataFrame
    table: pd.DataFrame
    files: list[Path]
    source: Path

    def row(self, m: int) -> str:
        return f"{self.source}, row {m + 1}"


@dataclass(frozen=True)
class Extraction:
    """What to cut: kept particles (micrograph order) and where their boxes are.

    tables: output metadata (optics incl. rlnMicrographPixelSize; particles with
    rlnMicrographName, rlnCoordinateX/Y, CTF and the coordinate files' other columns).
    """

    tables: ParticleTables
    files: list[Path]  # micrograph files, indexed by `mic`
    mic: np.ndarray  # (N,) int micrograph of each kept particle
    xy: np.ndarray  # (N, 2) int64 box centre (x, y), micrograph px
    labels: np.ndarray  # (N,) str '<coordinates file>, row k' of each kept particle
    box: int
    pixel_size: float  # Å/px of the micrographs
    skipped: int  # boxes crossing the micrograph edge
    picked_micrographs: int


def read_micrographs(path: Path, root: Path, defaults: OpticsDefaults) -> Micrographs:
    """Micrographs STAR (RELION 3.1, or one table with optics values from `defaults`)."""
    blocks = read_star(path)
    name = "micrographs" if "micrographs" in blocks else next(
        (k for k, v in blocks.items() if "rlnMicrographName" in v), None)
    if name is None:
        raise JobInputError(f"{path}: no micrographs table (no data block with rlnMicrographName)")
    table = blocks[name].reset_index(drop=True)
    missing = [c for c in PARTICLE_CTF if c not in table]
    if missing:
        raise JobInputError(f"{path}: missing CTF column {missing[0]} (per-micrograph CTF)")
    optics = blocks.get("optics")
    if optics is None:
        optics = pd.DataFrame({"rlnOpticsGroup": [1]})
        for col in OPTICS_CTF:
            if col in table and table[col].nunique() == 1:
                optics[col] = table[col].iloc[0]
        table["rlnOpticsGroup"] = 1
    optics = optics.reset_index(drop=True)
    if "rlnOpticsGroup" not in table:
        if len(optics) != 1:
            raise JobInputError(f"{path}: data_micrographs lacks rlnOpticsGroup")
        table["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
    unknown = ~table["rlnOpticsGroup"].isin(set(optics["rlnOpticsGroup"].tolist())).to_numpy()
    if unknown.any():
        m = int(np.flatnonzero(unknown)[0])
        raise JobInputError(f"{path}, row {m + 1}: rlnOpticsGroup not in data_optics")
    if "rlnMicrographPixelSize" in optics:
        optics["rlnImagePixelSize"] = optics["rlnMicrographPixelSize"]
    tables = ParticleTables(optics=optics, particles=table, source=path)
    complete_optics(tables, defaults)
    optics = tables.optics.assign(rlnMicrographPixelSize=tables.optics["rlnImagePixelSize"])
    names = table["rlnMicrographName"].astype(str).str.strip()
    files = [p if (p := Path(n)).is_absolute() else root / p for n in names]
    return Micrographs(optics=optics, table=table.assign(rlnMicrographName=names), files=files,
                       source=path)


def _match_names(names: pd.Series, mics: Micrographs, where: Callable[[int], str]) -> np.ndarray:
    """Micrograph index of each rlnMicrographName: exact name, else a unique file name."""
    exact = {n: m for m, n in enumerate(mics.table["rlnMicrographName"])}
    base = pd.Series([Path(n).name for n in mics.table["rlnMicrographName"]])
    unique = {b: m for m, b in enumerate(base) if (base == b).sum() == 1}
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names.astype(str).str.strip()):
        m = exact.get(name, unique.get(Path(name).name))
        if m is None:
            raise JobInputError(
                f"{where(i)}: micrograph {name} is not in {mics.source} (no CTF for it)")
        out[i] = m
    return out


def _micrograph_of_file(path: Path, mics: Micrographs) -> int:
    """The micrograph whose name stem the coordinate file's stem equals or starts with + '_'."""
    stem = path.stem
    best, best_len = -1, -1
    for m, name in enumerate(mics.table["rlnMicrographName"]):
        s = Path(name).stem
        if (stem == s or stem.startswith(s + "_")) and len(s) >= best_len:
            if len(s) == best_len:
                raise JobInputError(f"{path}: matches more than one micrograph in {mics.source}")
            best, best_len = m, len(s)
    if best < 0:
        raise JobInputError(
            f"{path}: names no micrograph of {mics.source} (no CTF for it; coordinate files are "
            "named <micrograph stem>_<suffix>.star)")
    return best


def _coordinate_table(blocks: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    for key in ("particles", "", *blocks):
        if key in blocks and set(COORDS) <= set(blocks[key].columns):
            return blocks[key].reset_index(drop=True)
    return None


def read_coordinates(
    spec: str, project_dir: Path, mics: Micrographs
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Picks of a glob of coordinate files or of one particles STAR.

    Returns (table with COORDS and other pick columns, micrograph index (N,), row labels (N,)).
    """
    pattern = spec if Path(spec).is_absolute() else str(project_dir / spec)
    if _GLOB_CHARS & set(spec):
        files = [Path(f) for f in sorted(glob.glob(pattern))]
        if not files:
            raise JobInputError(f"coords: no coordinate files match {pattern}")
    else:
        files = [Path(pattern)]
    tables, mic, labels = [], [], []
    for path in files:
        blocks = read_star(path)
        table = _coordinate_table(blocks)
        if table is None:
            if blocks and any(len(v) for v in blocks.values()):
                raise JobInputError(f"{path}: no table with rlnCoordinateX and rlnCoordinateY")
            continue  # an empty coordinate file: no picks
        label = np.array([f"{path}, row {i + 1}" for i in range(len(table))], dtype=object)
        if "rlnMicrographName" in table:
            mic.append(_match_names(table["rlnMicrographName"], mics, lambda i, lb=label: lb[i]))
        else:
            mic.append(np.full(len(table), _micrograph_of_file(path, mics)))
        drop = ["rlnMicrographName", "rlnOpticsGroup"]
        tables.append(table.drop(columns=[c for c in drop if c in table]))
        labels.append(label)
    if not tables:
        raise JobInputError(f"coords: no picks in {pattern}")
    return (pd.concat(tables, ignore_index=True), np.concatenate(mic),
            np.concatenate(labels))


def _check_ctf(mics: Micrographs, used: np.ndarray) -> None:
    for col in MICROGRAPH_CTF:
        if col not in mics.table:
            continue
        values = pd.to_numeric(mics.table[col], errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values[used])
        if bad.any():
            m = int(used[np.flatnonzero(bad)[0]])
            raise JobInputError(f"{mics.row(m)}: {col} is missing or not a finite number")
    pixel = mics.optics["rlnMicrographPixelSize"].astype(float).to_numpy()
    if not np.allclose(pixel, pixel[0], rtol=PIXEL_SIZE_RTOL, atol=0):
        raise JobInputError(f"{mics.source}: optics groups have different micrograph pixel sizes "
                            f"{sorted(set(pixel.tolist()))} (one ParticleSet has one pixel size)")


def _shapes(mics: Micrographs, used: np.ndarray, pixel_size: float) -> dict[int, tuple[int, int]]:
    """(ny, nx) of each used micrograph from its header; pixel size checked against the STAR."""
    shapes = {}
    for m in used:
        try:
            h = read_stack_header(mics.files[m])
        except JobInputError as exc:
            raise JobInputError(f"{mics.row(m)}: {exc}") from exc
        if h.n != 1:
            raise JobInputError(f"{mics.row(m)}: {h.path} is a stack of {h.n}, not one micrograph")
        if h.voxel_size_A > 0 and not np.isclose(h.voxel_size_A, pixel_size,
                                                 rtol=PIXEL_SIZE_RTOL, atol=0):
            raise JobInputError(f"{mics.row(m)}: pixel size {pixel_size:g} Å in the STAR but "
                                f"{h.voxel_size_A:g} Å in the header of {h.path}")
        shapes[int(m)] = (h.ny, h.nx)
    return shapes


def plan_extraction(mics: Micrographs, picks: pd.DataFrame, mic: np.ndarray, labels: np.ndarray,
                    box: int) -> Extraction:
    """Validate picks against the micrographs (headers only) and lay out the output table."""
    used = np.unique(mic)
    _check_ctf(mics, used)
    pixel_size = float(mics.optics["rlnMicrographPixelSize"].iloc[0])
    shapes = _shapes(mics, used, pixel_size)
    xy_f = np.stack([pd.to_numeric(picks[c], errors="coerce").to_numpy(float) for c in COORDS], 1)
    shape = np.array([shapes[int(m)] for m in mic]).reshape(-1, 2)[:, ::-1]  # (nx, ny)
    outside = ~np.isfinite(xy_f).all(axis=1) | (xy_f < 0).any(axis=1) | (xy_f > shape - 1).any(1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise JobInputError(
            f"{labels[i]}: coordinate ({xy_f[i, 0]:g}, {xy_f[i, 1]:g}) is outside micrograph "
            f"{mics.files[mic[i]]} ({shape[i, 0]} x {shape[i, 1]} px)")
    xy = np.rint(xy_f).astype(np.int64)
    inside = ((xy >= box // 2) & (xy + box // 2 <= shape)).all(axis=1)
    order = np.argsort(mic, kind="stable")
    order = order[inside[order]]

    particles = picks.iloc[order].reset_index(drop=True)
    rows = mics.table.iloc[mic[order]].reset_index(drop=True)
    particles.insert(0, "rlnMicrographName", rows["rlnMicrographName"].to_numpy())
    for col in MICROGRAPH_CTF:
        if col in mics.table and col not in particles:
            particles[col] = rows[col].to_numpy()
    particles["rlnOpticsGroup"] = rows["rlnOpticsGroup"].to_numpy()
    for col in MICROGRAPH_CTF:  # values a particles STAR given as coords carries itself
        if col in particles:
            bad = ~np.isfinite(pd.to_numeric(particles[col], errors="coerce").to_numpy(float))
            if bad.any():
                raise JobInputError(f"{labels[order[np.flatnonzero(bad)[0]]]}: {col} is "
                                    "missing or not a finite number")
    tables = ParticleTables(optics=mics.optics, particles=particles, source=mics.source)
    return Extraction(tables=tables, files=mics.files, mic=mic[order], xy=xy[order],
                      labels=labels[order], box=box, pixel_size=pixel_size,
                      skipped=int((~inside).sum()), picked_micrographs=len(used))


def iter_boxes(ex: Extraction, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first particle row, raw boxes float32 (B, box, box)) in particle order.

    One micrograph is memory-mapped at a time; a batch never spans two micrographs.
    """
    half = ex.box // 2
    bounds = np.flatnonzero(np.diff(ex.mic, prepend=-1, append=-1))
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        with mrcfile.mmap(ex.files[ex.mic[lo]], mode="r") as mrc:
            data = mrc.data.reshape(mrc.data.shape[-2:])
            for start in range(lo, hi, batch_size):
                stop = min(start + batch_size, hi)
                yield start, np.stack([
                    np.asarray(data[y - half: y + half, x - half: x + half], dtype=np.float32)
                    for x, y in ex.xy[start:stop]])
