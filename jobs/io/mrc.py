"""MRC image stacks: header checks, memory-mapped batch reads, streamed float32 writes.

Stacks are (N, D, D) in [image, y, x] order; a single 2D MRC reads as a stack of one.
Voxel sizes are in Å.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import mrcfile
import numpy as np

from jobs.errors import JobInputError

#: How many input stacks a reader keeps memory-mapped at once.
MAX_OPEN_STACKS = 64


@dataclass(frozen=True)
class StackHeader:
    """Shape and pixel size of one MRC stack (voxel_size_A 0 when the header leaves it unset)."""

    path: Path
    n: int
    ny: int
    nx: int
    voxel_size_A: float


def _open(path: Path) -> mrcfile.mrcmemmap.MrcMemmap:
    if not path.is_file():
        raise JobInputError(f"{path}: MRC stack not found")
    try:
        return mrcfile.mmap(path, mode="r")
    except (ValueError, OSError) as exc:
        raise JobInputError(f"{path}: not a readable MRC file ({exc})") from exc


def read_stack_header(path: Path) -> StackHeader:
    """Header of an MRC stack; raises JobInputError if missing, malformed or truncated."""
    with _open(path) as mrc:
        shape = mrc.data.shape
        voxel = float(mrc.voxel_size.x)
    if len(shape) == 2:
        shape = (1, *shape)
    return StackHeader(path=path, n=shape[0], ny=shape[1], nx=shape[2], voxel_size_A=voxel)


class StackReader:
    """Reads images from MRC stacks through memory maps (a few kept open, least recent closed)."""

    def __init__(self) -> None:
        self._open: OrderedDict[Path, mrcfile.mrcmemmap.MrcMemmap] = OrderedDict()

    def __enter__(self) -> StackReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _data(self, path: Path) -> np.ndarray:
        mrc = self._open.get(path)
        if mrc is None:
            mrc = _open(path)
            self._open[path] = mrc
            if len(self._open) > MAX_OPEN_STACKS:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(path)
        data = mrc.data
        return data[None] if data.ndim == 2 else data

    def read(self, path: Path, index: np.ndarray) -> np.ndarray:
        """Images `index` (0-based, any order) of stack `path` -> float32 (len(index), ny, nx)."""
        data = self._data(path)
        return np.asarray(data[np.asarray(index, dtype=np.int64)], dtype=np.float32)

    def gather(self, paths: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Images at (paths[i], index[i]) for each i, in that order -> float32 (B, ny, nx)."""
        out: np.ndarray | None = None
        for path in dict.fromkeys(paths.tolist()):
            rows = np.flatnonzero(paths == path)
            images = self.read(Path(path), index[rows])
            if out is None:
                out = np.empty((len(paths), *images.shape[1:]), dtype=np.float32)
            out[rows] = images
        return out if out is not None else np.empty((0, 0, 0), dtype=np.float32)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


MRC_LABEL = b"cryodag"


def fix_label(path: Path) -> None:
    """Replace mrcfile's creation-time label: the same data give the same bytes."""
    with mrcfile.mmap(path, mode="r+") as mrc:
        mrc.header.label[0] = MRC_LABEL
        mrc.header.nlabl = 1


def write_mrc(path: Path, data: np.ndarray, voxel_size_A: float) -> None:
    """Write a map, image or stack as float32 MRC with its voxel size (reproducible bytes)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size_A
    fix_label(path)


class StackWriter:
    """Writes an (n, D, D) float32 MRC stack batch by batch (plain file writes, no mapping).

    The header (voxel size, image-stack space group) is written first; the data statistics
    (accumulated per batch in float64) on `close`. The file is complete only once all n
    images were written.
    """

    def __init__(self, path: Path, n: int, box: int, pixel_size_A: float) -> None:
        self.path = path
        self.n = n
        with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = pixel_size_A
            self._offset = int(mrc.header.nbytes + mrc.extended_header.nbytes)
            self._dtype = mrc.data.dtype
        self._image_bytes = box * box * self._dtype.itemsize
        self._file: BinaryIO | None = open(path, "r+b")  # noqa: SIM115 (closed in close())
        self._next = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self._min = np.inf
        self._max = -np.inf

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def written(self) -> int:
        return self._next

    def write(self, images: np.ndarray) -> None:
        """Append a batch (B, D, D) of images."""
        b = len(images)
        if self._file is None or self._next + b > self.n:
            raise ValueError(f"{self.path}: writing past the {self.n} images of the stack")
        self._file.seek(self._offset + self._next * self._image_bytes)
        self._file.write(np.ascontiguousarray(images, dtype=self._dtype).tobytes())
        self._next += b
        if b:
            x = images.astype(np.float64, copy=False)
            self._sum += float(x.sum())
            self._sumsq += float(np.square(x).sum())
            self._min = min(self._min, float(x.min()))
            self._max = max(self._max, float(x.max()))

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        with mrcfile.mmap(self.path, mode="r+") as mrc:
            count = max(self._next, 1) * int(mrc.header.nx) * int(mrc.header.ny)
            mean = self._sum / count
            mrc.header.dmean = mean
            mrc.header.rms = np.sqrt(max(self._sumsq / count - mean * mean, 0.0))
            mrc.header.dmin = self._min if self._next else 0.0
            mrc.header.dmax = self._max if self._next else 0.0
            mrc.header.label[0] = MRC_LABEL
            mrc.header.nlabl = 1
