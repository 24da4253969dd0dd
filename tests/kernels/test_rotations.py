"""Rotation conventions (U9): RELION Euler ZYZ, quaternions, cryoSPARC rotation vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from kernels.rotations import (
    angular_distance_deg,
    best_frame,
    cryosparc_from_relion,
    errors_in_best_frame,
    errors_in_class_frames,
    euler_to_matrix,
    inplane_matrices,
    matrix_to_euler,
    matrix_to_quat,
    matrix_to_rotvec,
    quat_to_matrix,
    random_rotations,
    relion_from_cryosparc,
    rotvec_to_matrix,
)


def _random_euler(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)


def test_euler_matrix_is_relion() -> None:
    rot, tilt, psi = 23.0, 61.0, -117.0
    a, b, g = map(math.radians, (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = (math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(g),
                              math.sin(g))
    ref = np.array([
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ])
    A = euler_to_matrix(rot, tilt, psi)
    assert A.shape == (1, 3, 3)
    assert np.abs(A[0] - ref).max() < 1e-15
    # independent: RELION A is the transpose of the active intrinsic ZYZ rotation (rot, tilt, psi)
    rng = np.random.default_rng(0)
    e = _random_euler(rng, 100)
    act = Rotation.from_euler("ZYZ", np.stack(e, 1), degrees=True).as_matrix()
    assert np.abs(euler_to_matrix(*e) - np.swapaxes(act, 1, 2)).max() < 1e-14
    # last row = projection direction (sin t cos r, sin t sin r, cos t)
    R = euler_to_matrix(*e)
    r, t = np.radians(e[0]), np.radians(e[1])
    d = np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], 1)
    assert np.abs(R[:, 2] - d).max() < 1e-15


def test_u9_round_trips() -> None:
    rng = np.random.default_rng(1)
    e = _random_euler(rng, 2000)
    R = euler_to_matrix(*e)
    assert np.abs(quat_to_matrix(matrix_to_quat(R)) - R).max() < 1e-10
    assert np.abs(rotvec_to_matrix(matrix_to_rotvec(R)) - R).max() < 1e-10
    assert np.abs(euler_to_matrix(*matrix_to_euler(R)) - R).max() < 1e-10
    v = cryosparc_from_relion(*e)
    assert v.shape == (2000, 3) and np.all(np.linalg.norm(v, axis=1) <= np.pi + 1e-12)
    assert np.abs(euler_to_matrix(*relion_from_cryosparc(v)) - R).max() < 1e-10
    # angles themselves come back (tilt in (0, 180), rot/psi in (-180, 180])
    rot, tilt, psi = relion_from_cryosparc(v)
    wrap = lambda x: (x + 180) % 360 - 180  # noqa: E731
    assert np.abs(wrap(rot - e[0])).max() < 1e-8 and np.abs(tilt - e[1]).max() < 1e-8
    assert np.abs(wrap(psi - e[2])).max() < 1e-8


def test_cryosparc_convention_pyem() -> None:
    rng = np.random.default_rng(2)
    v = rng.normal(size=(50, 3))
    # standard active Rodrigues matrix (scipy) ...
    assert np.abs(rotvec_to_matrix(v) - Rotation.from_rotvec(v).as_matrix()).max() < 1e-14
    # ... and RELION A = its transpose (pyem csparc2star: rot2euler(expmap(pose)))
    A = euler_to_matrix(*relion_from_cryosparc(v))
    assert np.abs(A - np.swapaxes(Rotation.from_rotvec(v).as_matrix(), 1, 2)).max() < 1e-12
    # identity and tiny rotations
    assert np.abs(rotvec_to_matrix(np.zeros((1, 3))) - np.eye(3)).max() == 0
    small = np.array([[1e-9, -2e-9, 3e-10]])
    assert np.abs(matrix_to_rotvec(rotvec_to_matrix(small)) - small).max() < 1e-18


def test_quaternions_match_scipy() -> None:
    R = random_rotations(200, np.random.default_rng(3))
    q = matrix_to_quat(R)
    ref = Rotation.from_matrix(R).as_quat(scalar_first=True)
    ref *= np.sign(ref[:, :1])
    assert np.abs(q - ref).max() < 1e-12 and np.all(q[:, 0] >= 0)
    # 180-degree rotations (w = 0): pivot selection keeps them exact
    half = rotvec_to_matrix(np.pi * np.array([[1.0, 0, 0], [0, 1.0, 0], [0.6, 0, 0.8]]))
    assert np.abs(quat_to_matrix(matrix_to_quat(half)) - half).max() < 1e-12


def test_matrix_to_euler_gimbal_edges() -> None:
    for tilt in (0.0, 1e-13, 1e-9, 1e-4, 90.0, 180.0 - 1e-9, 180.0):
        A = euler_to_matrix(40.0, tilt, -70.0)
        rot, t, psi = matrix_to_euler(A)
        assert np.abs(euler_to_matrix(rot, t, psi) - A).max() < 1e-10
        assert 0.0 <= t[0] <= 180.0
    # RELION's convention at the poles: rot = 0, psi carries the combined in-plane angle
    rot, t, psi = matrix_to_euler(euler_to_matrix(40.0, 0.0, -70.0))
    assert (rot[0], t[0]) == (0.0, 0.0) and abs(psi[0] - (-30.0)) < 1e-12
    rot, t, psi = matrix_to_euler(euler_to_matrix(40.0, 180.0, -70.0))
    assert rot[0] == 0.0 and t[0] == 180.0 and abs(psi[0] - (-110.0)) < 1e-12


def test_random_rotations_uniform() -> None:
    n = 20000
    R = random_rotations(n, np.random.default_rng(4))
    assert np.abs(np.einsum("nij,nkj->nik", R, R) - np.eye(3)).max() < 1e-12
    assert np.allclose(np.linalg.det(R), 1.0)
    # Haar measure: E[R] = 0, rotation angle density (1 - cos t)/pi, E[t] = pi/2 + 2/pi
    assert np.abs(R.mean(0)).max() < 4 / math.sqrt(n)
    ang = np.radians(angular_distance_deg(R, np.eye(3)))
    sd = math.sqrt(math.pi**2 / 4 - 8 / math.pi**2 + 2) / math.sqrt(n)  # generous bound
    assert abs(ang.mean() - (math.pi / 2 + 2 / math.pi)) < 4 * sd


def test_angular_distance_and_inplane() -> None:
    for a in (1e-6, 0.5, 37.0, 179.0):
        d = angular_distance_deg(euler_to_matrix(10.0, 30.0, 20.0),
                                 euler_to_matrix(10.0, 30.0, 20.0 + a))
        assert abs(d[0] - a) < 1e-9 * max(1.0, a)
    psi = np.array([0.0, 30.0, -135.0])
    M = inplane_matrices(psi)
    np.testing.assert_allclose(M, euler_to_matrix(0.0, 0.0, psi)[:, :2, :2], atol=1e-15)
    np.testing.assert_allclose(np.linalg.det(M), 1.0)


@pytest.mark.parametrize("mirrored", [False, True])
def test_errors_in_best_frame(mirrored: bool) -> None:
    """Poses in an arbitrary frame (and hand) with a known 3° error and 10% random outliers:
    the fitted frame gives back 3° for the inliers, the hand, and large errors for the outliers;
    best_frame returns the frame itself."""
    rng = np.random.default_rng(3)
    n = 400
    R_true, G = random_rotations(n, rng), random_rotations(1, rng)[0]
    axis = rng.standard_normal((n, 3))
    noise = rotvec_to_matrix(np.radians(3.0) * axis / np.linalg.norm(axis, axis=1, keepdims=True))
    F = np.diag([1.0, 1.0, -1.0])
    T = F @ R_true @ F if mirrored else R_true
    R = noise @ T @ G
    outliers = rng.random(n) < 0.1
    R[outliers] = random_rotations(int(outliers.sum()), rng)
    err, hand = errors_in_best_frame(R, R_true)
    assert hand == mirrored
    assert np.allclose(err[~outliers], 3.0, atol=0.2)
    assert np.median(err[outliers]) > 30.0
    fitted, hand = best_frame(R, R_true)
    assert hand == mirrored
    assert angular_distance_deg(fitted, G) < 0.5


def test_errors_in_class_frames() -> None:
    """Two classes whose poses are exact in two different frames (one mirrored): zero error for
    both; a class of 2 particles is left out."""
    rng = np.random.default_rng(4)
    R_true = random_rotations(302, rng)
    cls = np.repeat([0, 1, 2], [150, 150, 2])
    G = random_rotations(2, rng)
    F = np.diag([1.0, 1.0, -1.0])
    R = R_true.copy()
    R[cls == 0] = R_true[cls == 0] @ G[0]
    R[cls == 1] = F @ R_true[cls == 1] @ F @ G[1]
    err = errors_in_class_frames(R, R_true, cls)
    assert err.shape == (300,)
    assert err.max() < 1e-3
