"""Duplicate picks: which particles to keep so no two kept ones on a micrograph are too close.

Greedy by score (as RELION's and cryoSPARC's duplicate removal): visit particles from the
highest score down (ties: earlier index first); keep a particle unless a kept one lies
closer than the separation on the same micrograph. Neighbour pairs come from a KD-tree per
group, so cost is O(N log N) plus a loop over close pairs only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial import cKDTree

from kernels.backend import to_host


def close_pairs(coords: np.ndarray, groups: np.ndarray, distance: float) -> np.ndarray:
    """(P, 2) int64 index pairs (i < j) in the same group with |coords_i - coords_j| < distance.

    coords: (N, 2) float positions; groups: (N,) labels (micrograph ids).
    """
    label, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(label) + 1))
    found = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        members = order[lo:hi]
        if len(members) < 2:
            continue
        # query_pairs takes r inclusive; the largest float below `distance` makes it strict
        r = np.nextafter(distance, -np.inf)
        pairs = cKDTree(coords[members]).query_pairs(r, output_type="ndarray")
        found.append(members[pairs])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    return np.sort(pairs, axis=1)


def duplicate_keep_mask(
    coords: Any, scores: Any | None, groups: Any, min_separation: float
) -> np.ndarray:
    """(N,) bool: True for particles kept, greedy by score (see module doc).

    coords: (N, 2) positions (px); scores: (N,) higher is better (NaN counts as lowest), or
    None to prefer earlier particles; groups: (N,) micrograph labels; min_separation in the
    units of coords. Pairs at a distance >= min_separation never remove each other.
    """
    xy = to_host(coords).astype(np.float64).reshape(-1, 2)
    n = len(xy)
    pairs = close_pairs(xy, to_host(groups).ravel(), float(min_separation))
    keep = np.ones(n, dtype=bool)
    if not len(pairs):
        return keep
    if scores is None:
        rank = np.arange(n)
    else:
        s = to_host(scores).astype(np.float64).ravel()
        s = np.where(np.isnan(s), -np.inf, s)
        rank = np.empty(n, dtype=np.int64)
        rank[np.lexsort((np.arange(n), -s))] = np.arange(n)
    better_first = rank[pairs[:, 0]] > rank[pairs[:, 1]]
    pairs[better_first] = pairs[better_first][:, ::-1]  # column 0: the better of the two
    for a, b in pairs[np.argsort(rank[pairs[:, 0]], kind="stable")]:
        if keep[a]:
            keep[b] = False
    return keep
