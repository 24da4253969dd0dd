"""Point groups (kernels/symmetry.py) and map superposition (kernels/volume_align.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sim3d import simulate

from kernels.fsc import fsc
from kernels.rotations import random_rotations
from kernels.symmetry import point_group
from kernels.volume_align import align_volume, mirror, rotate_volume


def test_point_groups() -> None:
    for sym, n in (("C1", 1), ("c4", 4), ("D7", 14)):
        ops = point_group(sym)
        assert ops.shape == (n, 3, 3)
        np.testing.assert_allclose(ops[0], np.eye(3))
        np.testing.assert_allclose(np.einsum("gij,gkj->gik", ops, ops), np.broadcast_to(np.eye(3), ops.shape),
                                   atol=1e-12)
        prods = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 9)  # closed under composition
        assert all(np.abs(ops.reshape(-1, 9) - p).max(axis=1).min() < 1e-9 for p in prods)
    with pytest.raises(ValueError):
        point_group("O")


def test_align_recovers_rotation_shift_and_hand() -> None:
    """A map rotated, shifted by 2 px and mirrored is superposed back: corr > 0.98, the
    mirror is detected and FSC >= 0.8 up to shell 12 of 16."""
    ref = simulate([4], D=32, seed=1).maps[0]
    R = random_rotations(1, np.random.default_rng(3))[0]
    moved = mirror(np.roll(rotate_volume(ref, R, order=3), 2, axis=2))
    a = align_volume(moved, ref)
    f = fsc(a.volume, ref)
    print(f"corr {a.corr:.4f}, mirrored {a.mirrored}, FSC at shells 4, 8, 12: {np.round(f[[4, 8, 12]], 3)}")
    assert a.mirrored and a.corr > 0.98
    assert f[:13].min() >= 0.8
