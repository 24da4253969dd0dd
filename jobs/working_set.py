"""Particles at a working box: Fourier-cropped images, band data and CTFs, by index or streamed.

Shared by the jobs that classify or refine particles (class_2d, ab_initio, hetero_refine,
homo_refine, class_3d, var_3d). The working box D is the smallest even box whose Nyquist shell
exceeds the band limit r_max = floor(box * pixel_size / max_res_A) (2 shells of margin), so the
band limit is the maximum resolution; its pixel size is box * pixel_size / D. Only the requested
particles are read.

Pre-read [I] (RELION's "Pre-read all particles into RAM?", here of the cropped transforms): when
the transforms of all N particles at the working box, N x D x (D//2 + 1) complex64, fit in
``PREREAD_FRACTION`` of ``backend.memory_budget_bytes`` (available RAM, or free GPU memory with
CuPy) when the job starts, ``load`` keeps each particle's transform after its first read, so the
iterations of a job read and crop every image once instead of once per pass (demo var_3d, 5,390
particles at box 30: 21 MB, and the per-pass reading and cropping was ~20% of the job). Larger
sets are read again in every pass, as before. Each image is
transformed on its own, so on NumPy the values are bit-identical either way (on CuPy equal to FFT
rounding). The cap is per job: jobs running at once each take up to their 20%. DESIGN.md's "a job
never loads a whole particle stack" holds for the stacks; this bounded copy of the band-limited
working set is the exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from jobs.artifacts import ParticleSet
from jobs.context import JobContext
from jobs.errors import JobInputError
from jobs.io.mrc import StackReader
from jobs.io.star import ParticleTables
from jobs.particles import image_locations
from kernels.backend import memory_budget_bytes, to_device
from kernels.ctf import ctf_2d
from kernels.fourier import Band, fourier_crop, rfft2c

#: Fraction of the memory budget the pre-read transforms may take (module doc).
PREREAD_FRACTION = 0.2
CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
               "rlnSphericalAberration", "rlnAmplitudeContrast")


def working_geometry(box: int, pixel_size: float, max_res_A: float) -> tuple[int, float, int]:
    """(working box, its pixel size Å, band r_max shells) for a max resolution."""
    r = min(int(math.floor(box * pixel_size / max_res_A)), box // 2 - 1)
    if r < 2:
        raise JobInputError(f"max_res_A {max_res_A} Å is below 2 Fourier shells of the box")
    D = min(box, 2 * (r + 2))
    return D, box * pixel_size / D, min(r, D // 2 - 1)


class WorkingSet:
    """The particles of ``ps`` at working box D (pixel size Å) on array module xp.

    ``images(idx)`` -> (B, D, D) float32; ``ctf(idx, band)`` -> C (B, nF) float32;
    ``load(idx, band)`` -> (X (B, nF) complex64, C), from the pre-read transforms when they fit
    (module doc); ``stream(chunk, band)`` yields (indices, X, C) in STAR order with progress and
    cancellation through ctx.
    """

    def __init__(self, ps: ParticleSet, tables: ParticleTables, ctx: JobContext, D: int,
                 pixel_size: float, xp: ModuleType) -> None:
        self.ps, self.ctx, self.D, self.pixel_size, self.xp = ps, ctx, D, pixel_size, xp
        self.paths, self.index = image_locations(tables, ctx.project_dir)
        self._ctf = {c: tables.column(c).astype(np.float64) for c in CTF_COLUMNS}
        self._phase = (tables.column("rlnPhaseShift").astype(np.float64)
                       if tables.has("rlnPhaseShift") else np.zeros(len(tables)))
        n, half = len(tables), D * (D // 2 + 1)
        fits = n * half * 8 <= memory_budget_bytes(PREREAD_FRACTION)
        #: pre-read transforms (N, D, D//2+1) complex64 and which rows hold one, or None (module doc)
        self._fts = xp.empty((n, D, D // 2 + 1), dtype=xp.complex64) if fits else None
        self._read = np.zeros(n if fits else 0, dtype=bool)

    def _crop(self, images: np.ndarray) -> Any:
        x = to_device(images, self.xp)
        return x if x.shape[-1] == self.D else fourier_crop(x, self.D, ndim=2)

    def images(self, idx: np.ndarray) -> Any:
        with StackReader() as reader:
            return self._crop(reader.gather(self.paths[idx], self.index[idx]))

    def ctf(self, idx: np.ndarray, band: Band) -> Any:
        c, xp = self._ctf, self.xp
        return ctf_2d(self.D, self.pixel_size, *(xp.asarray(c[k][idx]) for k in CTF_COLUMNS[:3]),
                      voltage_kv=xp.asarray(c["rlnVoltage"][idx]),
                      cs_mm=xp.asarray(c["rlnSphericalAberration"][idx]),
                      amplitude_contrast=xp.asarray(c["rlnAmplitudeContrast"][idx]),
                      phase_shift_deg=xp.asarray(self._phase[idx]), band=band)

    def transforms(self, idx: np.ndarray) -> Any:
        """``rfft2c`` of the working-box images of particles idx (B, D, D//2+1) complex64, pre-read
        when they fit (module doc). idx: host integer array, any order, repeats allowed; the result
        is a copy. Not thread-safe (the loaders are called from one thread)."""
        xp = self.xp

        def read(rows: np.ndarray) -> Any:
            return rfft2c(xp.asarray(self.images(rows), dtype=xp.float32))

        if self._fts is None:
            return read(idx)
        new = np.unique(idx[~self._read[idx]])
        if new.size:
            self._fts[xp.asarray(new)] = read(new)
            self._read[new] = True
        return self._fts[xp.asarray(idx)]

    def load(self, idx: np.ndarray, band: Band) -> tuple[Any, Any]:
        """(X, C) of particles idx on ``band``."""
        return band.gather(self.transforms(idx)), self.ctf(idx, band)

    def stream(self, chunk: int, band: Band, label: str = "full pass") -> Iterator[tuple[np.ndarray, Any, Any]]:
        """(indices, X, C) of all particles in STAR order, ``chunk`` at a time through ``load``,
        with progress and cancellation through ctx."""
        n = self.ps.count
        for start in range(0, n, chunk):
            self.ctx.check_cancelled()
            idx = np.arange(start, min(start + chunk, n))
            self.ctx.progress(label, int(idx[-1]) + 1, n)
            yield idx, *self.load(idx, band)
