"""cryoSPARC particle .cs files (read with cryosparc-tools) -> RELION 3.1 `ParticleTables`.

Conversions: defocus Å as is, df_angle_rad and phase_shift_rad -> degrees;
alignments3D/pose (rotation vector) -> RELION (rot, tilt, psi) through
`kernels.rotations.relion_from_cryosparc`; alignments3D/shift (px at alignments3D/psize_A,
else blob/psize_A) -> rlnOriginXAngst/YAngst (Å, same sign); split 0/1 -> rlnRandomSubset
1/2; class 0..K-1 -> rlnClassNumber 1..K. 0-based blob/idx -> 1-based rlnImageName.
Optics groups are the distinct (pixel size, kV, Cs, Q0) combinations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from cryosparc.dataset import Dataset

from jobs.errors import JobInputError
from jobs.io.star import OpticsDefaults, ParticleTables, complete_optics
from kernels.rotations import relion_from_cryosparc

#: cryoSPARC field -> (RELION column, factor applied to the value).
_CTF = {
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0),
    "ctf/scale": ("rlnCtfScalefactor", 1.0),
}
_OPTICS = {
    "blob/psize_A": "rlnImagePixelSize",
    "ctf/accel_kv": "rlnVoltage",
    "ctf/cs_mm": "rlnSphericalAberration",
    "ctf/amp_contrast": "rlnAmplitudeContrast",
}


def _load(path: Path) -> Dataset:
    if not path.is_file():
        raise JobInputError(f"{path}: .cs file not found")
    try:
        return Dataset.load(str(path))
    except Exception as exc:  # numpy/cryosparc-tools raise several types on bad files
        raise JobInputError(f"{path}: not a readable cryoSPARC .cs file ({exc})") from exc


def read_particles_cs(path: Path, defaults: OpticsDefaults | None = None) -> ParticleTables:
    """Read a cryoSPARC particle .cs into RELION 3.1 layout (paths as stored, '>' stripped)."""
    ds = _load(path)
    fields = set(ds.fields())
    for f in ("blob/path", "blob/idx"):
        if f not in fields:
            raise JobInputError(f"{path}: missing field {f}")
    n = len(ds)
    blob_paths = np.asarray([p.lstrip(">") for p in ds["blob/path"]], dtype=object)
    idx = np.asarray(ds["blob/idx"], dtype=np.int64)
    names = [f"{i + 1:06d}@{p}" for i, p in zip(idx, blob_paths, strict=True)]
    cols: dict[str, np.ndarray] = {"rlnImageName": np.asarray(names)}
    for field, (col, factor) in _CTF.items():
        if field in fields:
            cols[col] = np.asarray(ds[field], dtype=np.float64) * factor
    cols.update(_alignments(ds, fields, path))
    if "location/micrograph_path" in fields:
        mics = ds["location/micrograph_path"]
        cols["rlnMicrographName"] = np.asarray([p.lstrip(">") for p in mics])
        if {"location/center_x_frac", "location/micrograph_shape"} <= fields:
            shape = np.asarray(ds["location/micrograph_shape"], dtype=np.float64)
            cols["rlnCoordinateX"] = np.asarray(ds["location/center_x_frac"]) * shape[:, 1]
            cols["rlnCoordinateY"] = np.asarray(ds["location/center_y_frac"]) * shape[:, 0]
    particles = pd.DataFrame(cols)

    optics_fields = {c: f for f, c in _OPTICS.items() if f in fields}
    key = pd.DataFrame(
        {c: np.asarray(ds[f], dtype=np.float64).round(6) for c, f in optics_fields.items()},
        index=range(n),
    )
    if "blob/shape" in fields:
        key["rlnImageSize"] = np.asarray(ds["blob/shape"])[:, -1].astype(np.int64)
    if key.shape[1]:
        group = key.groupby(list(key.columns), sort=False, dropna=False).ngroup().to_numpy() + 1
    else:
        group = np.ones(n, dtype=np.int64)
    first = pd.Series(np.arange(n)).groupby(group).first().to_numpy()
    optics = key.iloc[first].reset_index(drop=True)
    optics.insert(0, "rlnOpticsGroup", np.arange(1, len(optics) + 1))
    particles["rlnOpticsGroup"] = group
    tables = ParticleTables(optics=optics, particles=particles, source=path)
    complete_optics(tables, defaults or OpticsDefaults())
    return tables


def _alignments(ds: Dataset, fields: set[str], path: Path) -> dict[str, np.ndarray]:
    """RELION pose, shift, class and half-set columns from alignments3D (or alignments2D class)."""
    cols: dict[str, np.ndarray] = {}
    if "alignments3D/pose" in fields:
        pose = np.asarray(ds["alignments3D/pose"], dtype=np.float64)
        rot, tilt, psi = relion_from_cryosparc(pose)
        cols.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    if "alignments3D/shift" in fields:
        psize_field = "alignments3D/psize_A" if "alignments3D/psize_A" in fields else "blob/psize_A"
        if psize_field not in fields:
            raise JobInputError(
                f"{path}: alignments3D/shift needs alignments3D/psize_A or blob/psize_A"
            )
        shift = np.asarray(ds["alignments3D/shift"], dtype=np.float64)
        psize = np.asarray(ds[psize_field], dtype=np.float64)
        cols["rlnOriginXAngst"] = shift[:, 0] * psize
        cols["rlnOriginYAngst"] = shift[:, 1] * psize
    if "alignments3D/split" in fields:
        cols["rlnRandomSubset"] = np.asarray(ds["alignments3D/split"], dtype=np.int64) + 1
    for prefix in ("alignments3D", "alignments2D"):
        if f"{prefix}/class" in fields:
            cols["rlnClassNumber"] = np.asarray(ds[f"{prefix}/class"], dtype=np.int64) + 1
            break
    return cols
