"""Agreement of a classification with known labels (simulated-data truth): adjusted Rand
index, majority label per class and purity. Host NumPy; labels are any integers."""

from __future__ import annotations

import numpy as np
from scipy.special import comb


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Counts (n_a, n_b) of the pairs of the distinct labels of a and b (sorted order)."""
    ia = np.unique(a, return_inverse=True)[1]
    ib = np.unique(b, return_inverse=True)[1]
    M = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(M, (ia, ib), 1)
    return M


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985) of two labelings (N,): 1 identical, ~0 random."""
    M = contingency(np.asarray(a), np.asarray(b)).astype(np.float64)
    s, sa, sb = comb(M, 2).sum(), comb(M.sum(1), 2).sum(), comb(M.sum(0), 2).sum()
    e = sa * sb / comb(M.sum(), 2)
    return float((s - e) / (0.5 * (sa + sb) - e))


def purity(cls: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of particles whose true label is the majority true label of their class."""
    M = contingency(np.asarray(cls), np.asarray(truth))
    return float(M.max(axis=1).sum() / M.sum())
