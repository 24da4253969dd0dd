"""Rotation representations and conventions (RELION Euler ZYZ, quaternions, rotation vectors).

Sources checked (code search index, read only):

- RELION ``Euler_angles2matrix`` (3dem/relion, src/euler.cpp): with (a, b, g) = (rot, tilt,
  psi), A = [[cg cb ca - sg sa,  cg cb sa + sg ca, -cg sb],
             [-sg cb ca - cg sa, -sg cb sa + cg ca, sg sb],
             [sb ca,             sb sa,             cb   ]]
  i.e. A = Rz(psi) Ry(tilt) Rz(rot) with Rz(t) = [[c, s, 0], [-s, c, 0], [0, 0, 1]] and
  Ry(t) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]; the last row is the projection direction.
  ``Euler_matrix2angles`` returns tilt in [0, 180] (sign_sb is always +1 off the gimbal
  points) and, for |sin tilt| ~ 0, rot = 0 with psi = atan2(-A10, A00) (tilt 0) or
  atan2(A10, -A00) (tilt 180). ``matrix_to_euler`` follows these conventions but derives rot
  from the upper-left block given psi, which stays accurate (1e-15) for tiny tilts.
- pyem (asarnow/pyem, pyem/metadata/cryosparc2.py ``parse_cryosparc_2_cs``): cryoSPARC
  ``alignments3D/pose`` becomes RELION angles via ``rot2euler(expmap(pose))``; pyem's
  ``expmap`` (pyem/geom/convert*.py) builds the TRANSPOSE of the standard Rodrigues matrix
  (its element [0, 1] is +sin(t) w_z + ...). Hence A_relion = rotvec_to_matrix(pose).T
  with the standard (active, right-handed) Rodrigues ``rotvec_to_matrix`` used here.
  ``alignments3D/shift`` (px) is copied to rlnOriginX/Y without sign change, after scaling by
  alignments psize / blob psize (pyem/cli/csparc2star.py); shifts are handled at import.

All functions use float64 and work on NumPy or CuPy inputs; angles are in degrees.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels.backend import xp_of

_GIMBAL_EPS = 1e-12


def _as1d(xp: Any, a: Any) -> Any:
    return xp.atleast_1d(xp.asarray(a, dtype=xp.float64))


def euler_to_matrix(rot: Any, tilt: Any, psi: Any) -> Any:
    """RELION Euler_angles2matrix for arrays of angles (deg) -> (N, 3, 3)."""
    xp = xp_of(rot, tilt, psi)
    a, b, g = (xp.deg2rad(_as1d(xp, v)) for v in (rot, tilt, psi))
    a, b, g = xp.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = xp.cos(a), xp.sin(a), xp.cos(b), xp.sin(b), xp.cos(g), xp.sin(g)
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(R: Any) -> tuple[Any, Any, Any]:
    """Inverse of ``euler_to_matrix``: (N, 3, 3) -> (rot, tilt, psi) in degrees.

    tilt in [0, 180], rot and psi in (-180, 180]; at tilt 0 or 180 rot = 0 (RELION).
    """
    xp = xp_of(R)
    A = xp.asarray(R, dtype=xp.float64).reshape(-1, 3, 3)
    abs_sb = xp.sqrt(A[:, 0, 2] ** 2 + A[:, 1, 2] ** 2)
    regular = abs_sb > _GIMBAL_EPS
    tilt = xp.arctan2(abs_sb, A[:, 2, 2])
    psi_reg = xp.arctan2(A[:, 1, 2], -A[:, 0, 2])
    # Rz(psi)^T A = Ry(tilt) Rz(rot), whose row 1 is (-sin rot, cos rot, 0)
    sg, cg = xp.sin(psi_reg), xp.cos(psi_reg)
    rot_reg = xp.arctan2(-(sg * A[:, 0, 0] + cg * A[:, 1, 0]), sg * A[:, 0, 1] + cg * A[:, 1, 1])
    up = A[:, 2, 2] > 0
    psi_gimbal = xp.where(
        up, xp.arctan2(-A[:, 1, 0], A[:, 0, 0]), xp.arctan2(A[:, 1, 0], -A[:, 0, 0])
    )
    tilt = xp.where(regular, tilt, xp.where(up, 0.0, np.pi))
    rot = xp.where(regular, rot_reg, 0.0)
    psi = xp.where(regular, psi_reg, psi_gimbal)
    return xp.rad2deg(rot), xp.rad2deg(tilt), xp.rad2deg(psi)


def quat_to_matrix(q: Any) -> Any:
    """Unit quaternions (N, 4) as (w, x, y, z) -> active rotation matrices (N, 3, 3)."""
    xp = xp_of(q)
    q = xp.asarray(q, dtype=xp.float64).reshape(-1, 4)
    q = q / xp.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return xp.stack([xp.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_quat(R: Any) -> Any:
    """Rotation matrices (N, 3, 3) -> unit quaternions (N, 4) (w, x, y, z) with w >= 0."""
    xp = xp_of(R)
    A = xp.asarray(R, dtype=xp.float64).reshape(-1, 3, 3)
    tr = A[:, 0, 0] + A[:, 1, 1] + A[:, 2, 2]
    # Four algebraically equivalent candidates; use the one with the largest pivot.
    cands = xp.stack(
        [
            xp.stack([1 + tr, A[:, 2, 1] - A[:, 1, 2], A[:, 0, 2] - A[:, 2, 0],
                      A[:, 1, 0] - A[:, 0, 1]], axis=-1),
            xp.stack([A[:, 2, 1] - A[:, 1, 2], 1 + 2 * A[:, 0, 0] - tr,
                      A[:, 0, 1] + A[:, 1, 0], A[:, 0, 2] + A[:, 2, 0]], axis=-1),
            xp.stack([A[:, 0, 2] - A[:, 2, 0], A[:, 0, 1] + A[:, 1, 0],
                      1 + 2 * A[:, 1, 1] - tr, A[:, 1, 2] + A[:, 2, 1]], axis=-1),
            xp.stack([A[:, 1, 0] - A[:, 0, 1], A[:, 0, 2] + A[:, 2, 0],
                      A[:, 1, 2] + A[:, 2, 1], 1 + 2 * A[:, 2, 2] - tr], axis=-1),
        ],
        axis=1,
    )  # (N, 4 candidates, 4 components); candidate j has pivot at component j
    pivots = xp.stack([1 + tr, 1 + 2 * A[:, 0, 0] - tr, 1 + 2 * A[:, 1, 1] - tr,
                       1 + 2 * A[:, 2, 2] - tr], axis=-1)
    best = xp.argmax(pivots, axis=1)
    q = cands[xp.arange(A.shape[0]), best]
    q = q / xp.linalg.norm(q, axis=1, keepdims=True)
    return xp.where(q[:, :1] < 0, -q, q)


def rotvec_to_matrix(v: Any) -> Any:
    """Rotation vectors (N, 3) (axis * angle in rad) -> active rotation matrices (N, 3, 3)."""
    xp = xp_of(v)
    v = xp.asarray(v, dtype=xp.float64).reshape(-1, 3)
    theta = xp.linalg.norm(v, axis=1)
    half = 0.5 * theta
    # sin(theta/2)/theta with its series near 0
    small = theta < 1e-6
    safe = xp.where(small, 1.0, theta)
    k = xp.where(small, 0.5 - theta**2 / 48.0, xp.sin(half) / safe)
    q = xp.concatenate([xp.cos(half)[:, None], v * k[:, None]], axis=1)
    return quat_to_matrix(q)


def matrix_to_rotvec(R: Any) -> Any:
    """Rotation matrices (N, 3, 3) -> rotation vectors (N, 3) with angle in [0, pi]."""
    xp = xp_of(R)
    q = matrix_to_quat(R)
    s = xp.linalg.norm(q[:, 1:], axis=1)
    theta = 2.0 * xp.arctan2(s, q[:, 0])
    small = s < 1e-9
    factor = xp.where(small, 2.0 / xp.maximum(q[:, 0], 1e-300), theta / xp.where(small, 1.0, s))
    return q[:, 1:] * factor[:, None]


def relion_from_cryosparc(pose_rotvec: Any) -> tuple[Any, Any, Any]:
    """cryoSPARC ``alignments3D/pose`` (N, 3) -> RELION (rot, tilt, psi) in degrees."""
    A = xp_of(pose_rotvec).swapaxes(rotvec_to_matrix(pose_rotvec), -1, -2)
    return matrix_to_euler(A)


def cryosparc_from_relion(rot: Any, tilt: Any, psi: Any) -> Any:
    """RELION (rot, tilt, psi) in degrees -> cryoSPARC pose rotation vectors (N, 3)."""
    A = euler_to_matrix(rot, tilt, psi)
    return matrix_to_rotvec(xp_of(A).swapaxes(A, -1, -2))


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotations uniform on SO(3) (normalised Gaussian quaternions) -> (n, 3, 3) float64."""
    return quat_to_matrix(rng.standard_normal((n, 4)))


def angular_distance_deg(R1: Any, R2: Any) -> Any:
    """Geodesic angle (deg) between rotations R1 and R2, each (N, 3, 3) or broadcastable.

    Uses ||R1 - R2||_F = 2 sqrt(2) sin(theta / 2), accurate for small angles.
    """
    xp = xp_of(R1, R2)
    d = xp.asarray(R1, dtype=xp.float64) - xp.asarray(R2, dtype=xp.float64)
    fro = xp.sqrt(xp.sum(d * d, axis=(-2, -1)))
    return xp.rad2deg(2.0 * xp.arcsin(xp.clip(fro / (2.0 * np.sqrt(2.0)), 0.0, 1.0)))


def inplane_matrices(psi_deg: Any) -> Any:
    """2D rotations for in-plane angles (deg) -> (N, 2, 2): the upper-left block of
    ``euler_to_matrix(0, 0, psi)`` = [[cos, sin], [-sin, cos]] acting on (x, y) vectors."""
    xp = xp_of(psi_deg)
    p = xp.deg2rad(_as1d(xp, psi_deg))
    c, s = xp.cos(p), xp.sin(p)
    return xp.stack([xp.stack([c, s], axis=-1), xp.stack([-s, c], axis=-1)], axis=-2)


def best_frame(R: np.ndarray, R_true: np.ndarray, inlier_deg: float = 15.0,
               n_candidates: int = 150, seed: int = 0) -> tuple[np.ndarray, bool]:
    """The frame (G (3, 3), mirrored) of poses R (N, 3, 3) relative to the true poses R_true
    (N, 3, 3): a reconstruction's frame and hand are arbitrary, so R_i ~ T_i G with T = R_true
    or, for the other hand, F R_true F (F = diag(1, 1, -1)). G starts from the candidate
    T_i^T R_i (of ``n_candidates`` random particles) with the most errors below ``inlier_deg``
    and is then refined as the chordal mean over those inliers."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(R), min(n_candidates, len(R)), replace=False)
    hands = ((False, R_true), (True, mirror_rotations(R_true)))
    candidates = [(T, T[i].T @ R[i], mirrored) for mirrored, T in hands for i in picks]
    T, G, mirrored = max(candidates, key=lambda c: float(np.mean(angular_distance_deg(R, c[0] @ c[1]) < inlier_deg)))
    for _ in range(3):
        inliers = angular_distance_deg(R, T @ G) < inlier_deg
        u, _, vt = np.linalg.svd(np.einsum("nji,njk->ik", T[inliers], R[inliers]))
        G = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    return G, mirrored


def mirror_rotations(R: np.ndarray) -> np.ndarray:
    """Poses (N, 3, 3) of the mirror-image map: F R F with F = diag(1, 1, -1)."""
    F = np.diag([1.0, 1.0, -1.0])
    return F @ R @ F


def errors_in_best_frame(R: np.ndarray, R_true: np.ndarray, inlier_deg: float = 15.0,
                         n_candidates: int = 150, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Angular errors (N,) deg of poses R (N, 3, 3) from the true poses R_true (N, 3, 3) in the
    frame of R (``best_frame``). Returns (errors, mirrored)."""
    G, mirrored = best_frame(R, R_true, inlier_deg, n_candidates, seed)
    T = mirror_rotations(R_true) if mirrored else R_true
    return angular_distance_deg(R, T @ G), mirrored


def errors_in_class_frames(R: np.ndarray, R_true: np.ndarray, cls: np.ndarray, min_particles: int = 3) -> np.ndarray:
    """Angular errors (M,) deg of poses R (N, 3, 3) from R_true (N, 3, 3), the particles of each
    class (cls (N,)) in that class's own best frame and hand (maps of separate classes, e.g. from
    ab-initio, each have their own); classes of fewer than ``min_particles`` are left out."""
    out = [errors_in_best_frame(R[cls == k], R_true[cls == k])[0]
           for k in np.unique(cls) if (cls == k).sum() >= min_particles]
    return np.concatenate(out) if out else np.zeros(0)
