"""RELION particle STAR files: 3.0 (one table), 3.1 and 5 (data_optics + data_particles).

Whatever the version read, particle metadata comes out in RELION 3.1 layout
(`ParticleTables`): optics columns (pixel size, voltage, Cs, amplitude contrast) in the
optics table, shifts in Å (`rlnOriginXAngst/YAngst`), every other column passed through.
Units follow RELION: defocus in Å, angles in degrees, Cs in mm, voltage in kV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from jobs.errors import JobInputError

#: Particle columns that make a CTF (optics columns: `OPTICS_CTF`).
PARTICLE_CTF = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
OPTICS_CTF = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: Optics column -> Params field that supplies it where the metadata lacks it.
OPTICS_FILLS = {
    "rlnImagePixelSize": "pixel_size_A",
    "rlnVoltage": "voltage_kv",
    "rlnSphericalAberration": "cs_mm",
    "rlnAmplitudeContrast": "amplitude_contrast",
}
#: Per-particle columns of RELION 3.0 files that RELION 3.1 keeps in the optics table.
_LEGACY_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnBeamTiltX", "rlnBeamTiltY")
_LEGACY_PIXEL = ("rlnImagePixelSize", "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification")
_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


@dataclass(frozen=True)
class OpticsDefaults:
    """Optics values used only where the metadata lacks them (Å/px, kV, mm, fraction)."""

    pixel_size_A: float | None = None
    voltage_kv: float | None = None
    cs_mm: float | None = None
    amplitude_contrast: float | None = None


@dataclass
class ParticleTables:
    """Particle metadata in RELION 3.1 layout.

    optics: one row per optics group (`rlnOpticsGroup` 1..G, `rlnOpticsGroupName`, ...).
    particles: one row per particle, in file order, with `rlnOpticsGroup`.
    source: the file the metadata came from (named in error messages).
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    source: Path

    def __len__(self) -> int:
        return len(self.particles)

    def row(self, i: int) -> str:
        """Label of particle row i (0-based) for messages: '<file>, row <i+1>'."""
        return f"{self.source}, row {i + 1}"

    def column(self, name: str) -> np.ndarray:
        """Values of a particle or optics column, one per particle (optics joined by group)."""
        if name in self.particles:
            return self.particles[name].to_numpy()
        if name in self.optics:
            lookup = self.optics.set_index("rlnOpticsGroup")[name]
            return lookup.loc[self.particles["rlnOpticsGroup"].to_numpy()].to_numpy()
        raise KeyError(name)

    def numeric(self, name: str) -> np.ndarray:
        """A column as float64, one per particle; JobInputError naming the first bad row."""
        values = pd.to_numeric(pd.Series(self.column(name)), errors="coerce").to_numpy(float)
        bad = ~np.isfinite(values)
        if bad.any():
            raise JobInputError(f"{self.row(int(np.flatnonzero(bad)[0]))}: {name} is missing or not a finite number")
        return values

    def has(self, name: str) -> bool:
        return name in self.particles or name in self.optics


def read_star(path: Path) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file, keyed by block name ('' for a bare `data_`)."""
    if not path.is_file():
        raise JobInputError(f"{path}: STAR file not found")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises several types on malformed files
        raise JobInputError(f"{path}: not a readable STAR file ({exc})") from exc
    return {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}


def read_particles_star(path: Path, defaults: OpticsDefaults | None = None) -> ParticleTables:
    """Read a RELION 3.0, 3.1 or 5 particle STAR into 3.1 layout.

    3.0 files: optics groups are made from the distinct per-particle optics values, the
    pixel size comes from rlnImagePixelSize / rlnPixelSize / rlnDetectorPixelSize*1e4 /
    rlnMagnification, and rlnOriginX/Y (px) become rlnOriginXAngst/YAngst (Å).
    """
    defaults = defaults or OpticsDefaults()
    blocks = read_star(path)
    name = "particles" if "particles" in blocks else next(
        (k for k, v in blocks.items() if "rlnImageName" in v), None
    )
    if name is None:
        raise JobInputError(f"{path}: no particle table (no data block with rlnImageName)")
    particles = blocks[name].reset_index(drop=True)
    if "optics" in blocks:
        optics = blocks["optics"].reset_index(drop=True)
        if "rlnOpticsGroup" not in particles and "rlnOpticsGroup" in optics and len(optics) == 1:
            particles["rlnOpticsGroup"] = optics["rlnOpticsGroup"].iloc[0]
        _check_groups(optics, particles, path)
    else:
        optics, particles = _optics_from_legacy(particles)
    tables = ParticleTables(optics=optics, particles=particles, source=path)
    complete_optics(tables, defaults)
    _origins_to_angst(tables)
    return tables


def _check_groups(optics: pd.DataFrame, particles: pd.DataFrame, path: Path) -> None:
    for table, df in (("data_optics", optics), ("data_particles", particles)):
        if "rlnOpticsGroup" not in df:
            raise JobInputError(f"{path}: {table} lacks rlnOpticsGroup")
    known = set(optics["rlnOpticsGroup"].tolist())
    bad = ~particles["rlnOpticsGroup"].isin(known).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JobInputError(
            f"{path}, row {i + 1}: rlnOpticsGroup {particles['rlnOpticsGroup'].iloc[i]} "
            "is not in data_optics"
        )


def _legacy_pixel_size(df: pd.DataFrame) -> pd.Series | None:
    """Per-particle pixel size (Å) of a RELION 3.0 table, or None when it has none."""
    for col in ("rlnImagePixelSize", "rlnPixelSize"):
        if col in df:
            return df[col].astype(float)
    if "rlnDetectorPixelSize" in df and "rlnMagnification" in df:
        return df["rlnDetectorPixelSize"].astype(float) * 1e4 / df["rlnMagnification"].astype(float)
    return None


def _optics_from_legacy(particles: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a single-table (RELION 3.0) file into optics groups and particles."""
    key = particles[[c for c in _LEGACY_OPTICS if c in particles]].copy()
    pixel = _legacy_pixel_size(particles)
    if pixel is not None:
        key["rlnImagePixelSize"] = pixel.round(6)
    if key.shape[1]:
        group = key.groupby(list(key.columns), sort=False, dropna=False).ngroup().to_numpy() + 1
    else:
        group = np.ones(len(particles), dtype=np.int64)
    first = pd.Series(np.arange(len(particles))).groupby(group).first().to_numpy()
    optics = key.iloc[first].reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    optics.insert(1, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]])
    drop = [c for c in (*_LEGACY_OPTICS, *_LEGACY_PIXEL) if c in particles]
    particles = particles.drop(columns=drop).assign(rlnOpticsGroup=group)
    return optics, particles


def complete_optics(tables: ParticleTables, defaults: OpticsDefaults) -> None:
    """Fill missing optics values from `defaults`; raise naming the file when neither has one."""
    optics = tables.optics
    for col, param in OPTICS_FILLS.items():
        value = getattr(defaults, param)
        missing = optics[col].isna().to_numpy() if col in optics else np.ones(len(optics), bool)
        if not missing.any():
            continue
        if value is None:
            group = optics["rlnOpticsGroup"].iloc[int(np.flatnonzero(missing)[0])]
            raise JobInputError(
                f"{tables.source}: no {col} for optics group {group}; give the parameter {param}"
            )
        optics[col] = np.where(missing, value, optics.get(col, value))
    if "rlnOpticsGroupName" not in optics:
        names = [f"opticsGroup{g}" for g in optics["rlnOpticsGroup"]]
        optics.insert(1, "rlnOpticsGroupName", names)
    optics["rlnImageDimensionality"] = 2


def _origins_to_angst(tables: ParticleTables) -> None:
    """RELION 3.0 rlnOriginX/Y (px) -> rlnOriginXAngst/YAngst (Å), using each group's pixel size."""
    p = tables.particles
    if "rlnOriginX" not in p or "rlnOriginXAngst" in p:
        return
    pixel = tables.column("rlnImagePixelSize").astype(float)
    p["rlnOriginXAngst"] = p["rlnOriginX"].astype(float) * pixel
    p["rlnOriginYAngst"] = p.get("rlnOriginY", 0.0) * pixel
    tables.particles = p.drop(columns=[c for c in ("rlnOriginX", "rlnOriginY") if c in p])


def parse_image_names(tables: ParticleTables) -> tuple[np.ndarray, np.ndarray]:
    """rlnImageName 'N@path' -> (0-based index int64 (N,), path (N,)); 'path' alone = image 1."""
    if "rlnImageName" not in tables.particles:
        raise JobInputError(f"{tables.source}: missing column rlnImageName")
    names = tables.particles["rlnImageName"].astype(str)
    parts = names.str.extract(_IMAGE_NAME)
    plain = parts[0].isna().to_numpy()
    bad = plain & (names.str.contains("@", regex=False) | (names.str.strip() == "")).to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JobInputError(f"{tables.row(i)}: malformed rlnImageName {names.iloc[i]!r}")
    index = parts[0].fillna("1").astype(np.int64).to_numpy() - 1
    if (index < 0).any():
        i = int(np.flatnonzero(index < 0)[0])
        raise JobInputError(f"{tables.row(i)}: image index 0 in {names.iloc[i]!r} (counts from 1)")
    paths = parts[1].where(~plain, names.str.strip()).to_numpy(dtype=object)
    return index, paths


STAR_STAMP = "# Created by the starfile Python package"


def write_star(path: Path, blocks: dict[str, pd.DataFrame] | pd.DataFrame) -> None:
    """starfile.write without its time-stamped comment: the same tables give the same bytes."""
    starfile.write(blocks, path, float_format="%.6f")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(ln for ln in lines if not ln.startswith(STAR_STAMP)))


def write_particles_star(path: Path, tables: ParticleTables) -> None:
    """Write RELION 3.1 STAR (data_optics + data_particles)."""
    write_star(path, {"optics": tables.optics, "particles": tables.particles})
