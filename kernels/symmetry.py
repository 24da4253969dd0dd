"""Point-group operators in RELION's conventions: Cn about z, Dn = Cn plus a 2-fold about x."""

from __future__ import annotations

import re

import numpy as np


def point_group(symbol: str) -> np.ndarray:
    """All operators (G, 3, 3) of 'C<n>' or 'D<n>' (case-insensitive), identity first."""
    m = re.fullmatch(r"([CcDd])([1-9][0-9]*)", symbol.strip())
    if m is None:
        raise ValueError(f"symmetry {symbol!r}: only Cn and Dn are supported (e.g. C1, C4, D7)")
    n = int(m.group(2))
    a = 2 * np.pi * np.arange(n) / n
    c, s = np.cos(a), np.sin(a)
    ops = np.zeros((n, 3, 3))
    ops[:, 0, 0], ops[:, 0, 1], ops[:, 1, 0], ops[:, 1, 1], ops[:, 2, 2] = c, -s, s, c, 1.0
    if m.group(1).upper() == "D":
        flip = np.diag([1.0, -1.0, -1.0])
        ops = np.concatenate([ops, flip @ ops])
    return ops
