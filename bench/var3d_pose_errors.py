"""Do consensus pose errors that follow the latent cost 3D variability analysis? var_3d's engine on
the linear set of tests/kernels/test_var3d.py (D = 24 at 8 Å/px, 1,500 particles, SNR 2, one of
four domains changes by t ~ U[-1, 1]), with the true rotations turned in the body frame by
random errors (N(0, noise) per axis) alone, or plus a rotation omega x t_i about one fixed axis, as
a rigid consensus that partly aligns a moving domain away makes (bench/RESULTS.md, session 23);
with --states 3 the particles get random labels and each label its own axis, as the demo's states
whose consensus errors turn about different axes. With --fitted-bias c1,c2,... the t-following
rotation is instead the one a fit of each image against V(0) takes from the change: per particle
c x t_i x the rotation part of (P_i^T P_i)^{-1} P_i^T a_i (P_i: derivatives of C_i P_i V(0) along
3 rotations and 2 shifts, a_i = C_i P_i dV, noise-weighted inner products over var_3d's band),
which depends on the view, unlike a fixed axis (the linear theory of bench/var3d_pose_oracle.py;
on the demo the consensus's errors follow it with c ~ 1.5, bench/RESULTS.md session 25).

    .venv/bin/python bench/var3d_pose_errors.py [--change density|move] [--noise-deg 1.7]
        [--omega-deg 0,3,6 | --fitted-bias 0,1,3] [--pose-sd-deg 0,2] [--states 1|3]

Rows: omega (or c) and var_3d's pose freedom (prior s.d. per axis; 0: fixed poses); columns:
|corr(z_k, t)| of the three latents. A rotation linear in t is a linear change of the map in the
consensus frame (V0 turned by omega t ~ V0 + t dV_rot), so the components can hold it with the
density change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]

from sim3d import Linear3D, Set3D, simulate_linear  # noqa: E402

from kernels import var3d as v3  # noqa: E402
from kernels.fourier import Band  # noqa: E402
from kernels.projection import prepare_volume, project  # noqa: E402
from kernels.rotations import rotvec_to_matrix  # noqa: E402

D, A, R_MAX, FILTER_A, N = 24, 8.0, 10, 20.0, 1500
#: Unit axes (body frame) of the t-following rotation: the first for one state, all three for --states 3.
AXES = np.array([[0.6, -0.64, 0.48], [0.0, 0.8, -0.6], [-0.8, 0.0, 0.6]])


def fitted_bias(lin: Linear3D) -> np.ndarray:
    """Per particle, the rotation vector (N, 3) rad per unit t that a least-squares fit of its pose
    (3 rotations, 2 shifts, linearised) against V(0) takes from the change t dV (module doc)."""
    data, band = lin.data, Band(D, R_MAX)
    _, C = data.load(np.arange(N), band)
    v0, dv = (prepare_volume(np.asarray(m, dtype=np.float64)) for m in (data.maps[1], lin.dV))
    eps = np.radians(0.5)
    plus, minus = rotvec_to_matrix(np.eye(3) * eps), rotvec_to_matrix(-np.eye(3) * eps)
    cols = [C * (project(v0, data.R @ plus[j], band) - project(v0, data.R @ minus[j], band)) / (2 * eps)
            for j in range(3)]
    P0 = C * project(v0, data.R, band)
    cols += [P0 * (-2j * np.pi * band.on(np, k) / D) for k in ("kx", "ky")]
    P, a = np.stack(cols, axis=1), C * project(dv, data.R, band)

    def dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((np.conj(x) * y).real * band.on(np, "weight")).sum(axis=-1)

    G = dot(P[:, :, None, :], P[:, None, :, :])
    return np.linalg.solve(G, dot(P, a[:, None, :])[..., None])[:, :3, 0]


def latent_corr(R: np.ndarray, data: Set3D, t: np.ndarray, pose_sd_deg: float) -> np.ndarray:
    """|corr(z_k, t)| (3,) of var_3d (test_var3d's settings) run with rotations R (N, 3, 3)."""
    st = v3.Settings(n_components=3, D=D, pixel_size=A, r_max=R_MAX, n_iterations=6, filter_res_A=FILTER_A,
                     scale_mode="none", mask_near_px=1.0, mask_far_px=3.0, chunk=500, pose_sd_deg=pose_sd_deg)
    eng = v3.Var3D(st, np, R, data.shift, seed=0)
    eng.prepare(data.load, consensus=data.maps[1])
    eng.run(data.load)
    return np.array([abs(np.corrcoef(eng.z[:, k], t)[0, 1]) for k in range(3)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--change", choices=["density", "move"], default="density",
                    help="the domain's density x (1 + 0.5 t), or the domain moved by t x (1, 0.5, 0) px")
    ap.add_argument("--noise-deg", type=float, default=1.7, help="random rotation error s.d. per axis (deg)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--omega-deg", default="0,3,6", help="rotation per unit t (deg), comma-separated")
    ap.add_argument("--pose-sd-deg", default="0,2", help="var_3d pose freedom (deg), comma-separated")
    ap.add_argument("--states", type=int, choices=[1, 3], default=1, help="axes of the t-following rotation")
    how.add_argument("--fitted-bias", default="", help="factors c of the fitted, view-dependent bias instead of "
                                                      "--omega-deg (module doc), comma-separated")
    args = ap.parse_args()
    if args.fitted_bias and args.states != 1:
        ap.error("--states sets the axes of --omega-deg; --fitted-bias has its own per particle")
    kw = {"scale": 0.5} if args.change == "density" else {"move_px": (1.0, 0.5, 0.0)}
    lin = simulate_linear(N, D=D, pixel_size=A, snr=2.0, seed=1, **kw)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, np.deg2rad(args.noise_deg), (N, 3))
    axis = AXES[rng.integers(0, args.states, N)]
    if args.fitted_bias:
        bias = fitted_bias(lin)
        rows = {f"{c:g}": float(c) * bias for c in (float(x) for x in args.fitted_bias.split(","))}
        print(f"change: {args.change}; random errors {args.noise_deg} deg per axis; fitted bias: median "
              f"{np.degrees(np.median(np.linalg.norm(bias, axis=1))):.2f} deg per unit t\n")
        head = "fitted-bias factor c"
    else:
        rows = {f"{w:g}": np.deg2rad(w) * axis for w in (float(x) for x in args.omega_deg.split(","))}
        print(f"change: {args.change}; random errors {args.noise_deg} deg per axis; {args.states} axes\n")
        head = "omega (deg per unit t)"
    print(f"| {head} | pose freedom (deg) | \\|corr(z_k, t)\\|, k = 1, 2, 3 | s |")
    print("|---|---|---|---|")
    for name, per_t in rows.items():
        R = lin.data.R @ rotvec_to_matrix(per_t * lin.t[:, None] + noise)
        for sd in (float(x) for x in args.pose_sd_deg.split(",")):
            t0 = time.perf_counter()
            c = latent_corr(R, lin.data, lin.t, sd)
            print(f"| {name} | {sd:g} | {' / '.join(f'{x:.3f}' for x in c)} | {time.perf_counter() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
