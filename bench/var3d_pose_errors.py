"""Do consensus pose errors that follow the latent cost 3D variability analysis? var_3d's engine on
the linear set of tests/kernels/test_var3d.py (D = 24 at 8 Å/px, 1,500 particles, SNR 2, one of
four domains changes by t ~ U[-1, 1]), with the true rotations turned in the body frame by
random errors (N(0, noise) per axis) alone, or plus a rotation omega x t_i about one fixed axis, as
a rigid consensus that partly aligns a moving domain away makes (bench/RESULTS.md, session 23);
with --states 3 the particles get random labels and each label its own axis, as the demo's states
whose consensus errors turn about different axes.

    .venv/bin/python bench/var3d_pose_errors.py [--change density|move] [--noise-deg 1.7]
        [--omega-deg 0,3,6] [--pose-sd-deg 0,2] [--states 1|3]

Rows: omega and var_3d's pose freedom (prior s.d. per axis; 0: fixed poses); columns: |corr(z_k, t)|
of the three latents. A rotation linear in t is a linear change of the map in the consensus frame
(V0 turned by omega t ~ V0 + t dV_rot), so the components can hold it with the density change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]

from sim3d import Set3D, simulate_linear  # noqa: E402

from kernels import var3d as v3  # noqa: E402
from kernels.rotations import rotvec_to_matrix  # noqa: E402

D, A, R_MAX, FILTER_A, N = 24, 8.0, 10, 20.0, 1500
#: Unit axes (body frame) of the t-following rotation: the first for one state, all three for --states 3.
AXES = np.array([[0.6, -0.64, 0.48], [0.0, 0.8, -0.6], [-0.8, 0.0, 0.6]])


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
    ap.add_argument("--omega-deg", default="0,3,6", help="rotation per unit t (deg), comma-separated")
    ap.add_argument("--pose-sd-deg", default="0,2", help="var_3d pose freedom (deg), comma-separated")
    ap.add_argument("--states", type=int, choices=[1, 3], default=1, help="axes of the t-following rotation")
    args = ap.parse_args()
    kw = {"scale": 0.5} if args.change == "density" else {"move_px": (1.0, 0.5, 0.0)}
    lin = simulate_linear(N, D=D, pixel_size=A, snr=2.0, seed=1, **kw)
    rng = np.random.default_rng(3)
    noise = rng.normal(0, np.deg2rad(args.noise_deg), (N, 3))
    axis = AXES[rng.integers(0, args.states, N)]
    print(f"change: {args.change}; random errors {args.noise_deg} deg per axis; {args.states} axes\n")
    print("| omega (deg per unit t) | pose freedom (deg) | \\|corr(z_k, t)\\|, k = 1, 2, 3 | s |")
    print("|---|---|---|---|")
    for omega in (float(x) for x in args.omega_deg.split(",")):
        R = lin.data.R @ rotvec_to_matrix(np.deg2rad(omega) * axis * lin.t[:, None] + noise)
        for sd in (float(x) for x in args.pose_sd_deg.split(",")):
            t0 = time.perf_counter()
            c = latent_corr(R, lin.data, lin.t, sd)
            print(f"| {omega:g} | {sd:g} | {' / '.join(f'{x:.3f}' for x in c)} | {time.perf_counter() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
