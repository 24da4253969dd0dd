"""kernels.duplicates: greedy-by-score duplicate removal against a brute-force reference."""

from __future__ import annotations

import numpy as np

from kernels.duplicates import close_pairs, duplicate_keep_mask


def _reference(xy, scores, groups, r) -> np.ndarray:
    """O(N^2) greedy: best first, keep unless a kept one of the same group is closer than r."""
    n = len(xy)
    order = np.arange(n) if scores is None else np.lexsort((np.arange(n), -scores))
    keep = np.zeros(n, bool)
    for i in order:
        near = (groups == groups[i]) & (np.linalg.norm(xy - xy[i], axis=1) < r) & keep
        keep[i] = not near.any()
    return keep


def test_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 400
        xy = rng.uniform(0, 200, (n, 2))
        groups = rng.integers(0, 3, n)
        scores = None if trial == 0 else rng.normal(size=n)
        got = duplicate_keep_mask(xy, scores, groups, 9.0)
        np.testing.assert_array_equal(got, _reference(xy, scores, groups, 9.0))
        assert 0 < (~got).sum() < n


def test_chain_groups_ties_and_nan():
    # a chain at spacing 0.8 r: the best (middle) removes both neighbours
    xy = np.array([[0.0, 0], [8, 0], [16, 0]])
    assert duplicate_keep_mask(xy, np.array([1.0, 2, 1]), np.zeros(3), 10.0).tolist() == [
        False, True, False]
    # best first: 0 removes 1, so 2 (16 px from 0) survives
    assert duplicate_keep_mask(xy, np.array([3.0, 2, 1]), np.zeros(3), 10.0).tolist() == [
        True, False, True]
    # different micrographs never interact; a pair at exactly the separation is kept
    assert duplicate_keep_mask(np.zeros((2, 2)), None, np.array([0, 1]), 5.0).all()
    assert duplicate_keep_mask(np.array([[0.0, 0], [5, 0]]), None, np.zeros(2), 5.0).all()
    # ties keep the earlier particle; NaN scores lose
    pair = np.array([[0.0, 0], [1, 0]])
    assert duplicate_keep_mask(pair, np.array([1.0, 1.0]), np.zeros(2), 5.0).tolist() == [
        True, False]
    assert duplicate_keep_mask(pair, np.array([np.nan, -5.0]), np.zeros(2), 5.0).tolist() == [
        False, True]


def test_close_pairs_per_group():
    xy = np.array([[0.0, 0], [1, 0], [1, 0], [50, 50]])
    pairs = close_pairs(xy, np.array(["a", "a", "b", "a"]), 2.0)
    assert pairs.tolist() == [[0, 1]]
    assert close_pairs(xy[:1], np.zeros(1), 2.0).shape == (0, 2)
