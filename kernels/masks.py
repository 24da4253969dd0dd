"""Solvent masks made from a map (algorithms.md §1.11): threshold, dilation, soft edge.

cryoSPARC's refinement "dynamic mask" (threshold 0.2 of max, near 6 Å, far 14 Å) and 3D
classification auto mask (0.2, 10 Å, 20 Å) are the same construction with other distances.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from kernels.backend import to_host, xp_of


def threshold_mask(vol: Any, threshold: float = 0.2, near_px: float = 1.0, far_px: float = 3.0,
                   use_abs: bool = False) -> Any:
    """Soft mask (D, D, D) float32 on ``vol``'s array module.

    Core: voxels with vol >= threshold x max(vol) (|vol| and its max with ``use_abs``). The
    mask is 1 within Euclidean distance near_px (voxels) of the core and falls as a raised
    cosine to 0 at far_px. A map without positive values gives an all-zero mask.
    """
    if not 0.0 <= near_px < far_px:
        raise ValueError(f"need 0 <= near_px < far_px, got {near_px}, {far_px}")
    xp = xp_of(vol)
    v = to_host(vol).astype(np.float64)
    if use_abs:
        v = np.abs(v)
    top = float(v.max())
    if top <= 0:
        return xp.zeros(v.shape, dtype=xp.float32)
    dist = ndimage.distance_transform_edt(v < threshold * top)
    u = np.clip((dist - near_px) / (far_px - near_px), 0.0, 1.0)
    return xp.asarray((0.5 * (1.0 + np.cos(np.pi * u))).astype(np.float32))
