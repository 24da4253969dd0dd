"""2D classification: cryodag's class_2d job vs RELION 3.1 `relion_refine` on the same simulated set.

    .venv/bin/python bench/class2d.py [--particles 2000 --views 10 --box 64 --classes 20 ...]

Simulates an algorithms.md §3.5-style set (tests/kernels/c2d_views.py: discrete views of a
Gaussian-atom phantom, random psi and shifts, RELION CTF, white noise at --snr), normalised to
unit background noise (RELION expects it), writes it once as a ParticleSet (RELION 3.1 STAR +
MRC stack), then runs the class_2d job in-process and `relion_refine` 2D as a subprocess on
those files, both limited to --max-res Å. Wall times cover the classification only (cryodag:
`JOB.run`; RELION: the whole process). Prints the settings, the machine and a markdown table
with purity (fraction of particles in classes whose majority true view matches theirs), ARI
against the true views and the speed-up of cryodag over RELION.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]

from c2d_views import CS, Q0, VOLTAGE, simulate  # noqa: E402

from jobs.artifacts import ParticleSet  # noqa: E402
from jobs.class_2d import JOB  # noqa: E402
from jobs.context import JobContext  # noqa: E402
from jobs.io.star import ParticleTables  # noqa: E402
from jobs.particles import write_particle_set  # noqa: E402
from kernels import backend  # noqa: E402
from kernels.clustering import adjusted_rand_index as ari  # noqa: E402
from kernels.clustering import contingency, purity  # noqa: E402


def views_covered(cls: np.ndarray, view: np.ndarray) -> int:
    """Number of true views that are the majority view of at least one class."""
    return len(set(contingency(cls, view).argmax(1).tolist()))


def run_relion(cmd: list[str], root: Path, out: Path) -> float:
    """Run relion_refine (cwd ``root``, log in out/log.txt) -> wall time s; exits on failure."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print("RELION:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"relion_refine failed ({proc.returncode}); see {out / 'log.txt'}:\n"
                 + (out / "log.txt").read_text()[-2000:])
    return wall


def make_dataset(args: argparse.Namespace, root: Path) -> tuple[ParticleSet, np.ndarray]:
    """Simulate, normalise to unit noise std and write jobs/sim/particles.{star,mrcs} -> (set, view (N,))."""
    counts = np.full(args.views, args.particles // args.views)
    counts[: args.particles - counts.sum()] += 1
    vs = simulate(counts.tolist(), D=args.box, pixel_size=args.pixel, snr=args.snr, seed=args.seed,
                  max_corr=args.max_corr)
    print(f"simulated {args.particles} particles, {args.views} views "
          f"(max pairwise aligned corr {vs.max_view_corr:.2f}), noise var {vs.noise_var:.3g} -> 1")
    images = (vs.images / np.sqrt(vs.noise_var)).astype(np.float32)
    sim = root / "jobs" / "sim"
    ctx = JobContext(name="sim", project_dir=root, work_dir=sim, final_dir=sim)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [VOLTAGE], "rlnSphericalAberration": [CS],
                           "rlnAmplitudeContrast": [Q0], "rlnImagePixelSize": [args.pixel]})
    parts = pd.DataFrame({"rlnDefocusU": vs.defocus_u, "rlnDefocusV": vs.defocus_v,
                          "rlnDefocusAngle": vs.defocus_angle, "rlnOpticsGroup": 1})
    tables = ParticleTables(optics=optics, particles=parts, source=root / "sim.star")
    return write_particle_set(ctx, "particles", tables, [images], args.box, args.pixel), vs.view


def run_cryodag(args: argparse.Namespace, root: Path, ps: ParticleSet) -> tuple[np.ndarray, float]:
    """class_2d in-process -> (class (N,) in input order, wall time s)."""
    job = root / "jobs" / "c2d"
    shutil.rmtree(job, ignore_errors=True)  # no resume from an earlier checkpoint
    ctx = JobContext(name="c2d", project_dir=root, work_dir=job, final_dir=job)
    params = JOB.params(num_classes=args.classes, max_res_A=args.max_res, num_oem_iterations=args.oem_iter,
                        batch_size_per_class=args.batch_per_class, seed=args.seed)
    t0 = time.perf_counter()
    JOB.run(params, {"particles": ps}, ctx)
    wall = time.perf_counter() - t0
    parts = starfile.read(job / "particles.star", always_dict=True)["particles"]
    return parts["rlnClassNumber"].to_numpy(), wall


def relion_command(args: argparse.Namespace, star: str) -> list[str]:
    """relion_refine 2D classification (run from the project directory)."""
    return ["relion_refine", "--o", "relion/run", "--i", star, "--dont_combine_weights_via_disc",
            "--pool", "30", "--pad", "2", "--ctf", "--iter", str(args.relion_iter), "--tau2_fudge", "2",
            "--particle_diameter", f"{0.8 * args.box * args.pixel:.0f}", "--K", str(args.classes),
            "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--psi_step", "10",
            "--offset_range", "5", "--offset_step", "2", "--norm", "--scale", "--j", str(args.threads),
            "--strict_highres_exp", f"{args.max_res:g}",
            "--random_seed", str(args.seed + 1)]  # seed 0 would switch off RELION's particle-order shuffle


def classify_relion(args: argparse.Namespace, root: Path, ps: ParticleSet) -> tuple[np.ndarray, float]:
    """relion_refine as a subprocess -> (class (N,) in input order, wall time s)."""
    out = root / "relion"
    wall = run_relion(relion_command(args, ps.star), root, out)
    last = sorted(out.glob("run_it*_data.star"))[-1]
    data = starfile.read(last, always_dict=True)["particles"]
    inp = starfile.read(root / ps.star, always_dict=True)["particles"]
    order = pd.Series(np.arange(len(inp)), index=inp["rlnImageName"].to_numpy())
    cls = np.zeros(len(inp), np.int64)
    cls[order[data["rlnImageName"].to_numpy()].to_numpy()] = data["rlnClassNumber"].to_numpy()
    if len(data) != len(inp) or (cls == 0).any():
        sys.exit(f"{last.name}: {len(data)} particles, expected {len(inp)} with a class each")
    return cls, wall


def common_args(ap: argparse.ArgumentParser) -> None:
    """Options every RELION-comparison bench has: --seed, --out, --skip-relion."""
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="working directory (default: a new temp dir)")
    ap.add_argument("--skip-relion", action="store_true")


def start(args: argparse.Namespace, prefix: str) -> Path:
    """Check RELION (unless --skip-relion), pick the backend (CuPy when usable), make the
    working directory and print the machine line; returns the directory."""
    if not args.skip_relion and shutil.which("relion_refine") is None:
        sys.exit("relion_refine not found (use --skip-relion)")
    os.environ.setdefault("CRYODAG_BACKEND", "cupy" if backend.cupy_available() else "numpy")
    root = (args.out or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; cryodag backend {backend.name()} "
          "(BLAS threads: library default). Other processes may share the CPUs: timings are noisy.")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--box", type=int, default=64, help="box (px)")
    ap.add_argument("--pixel", type=float, default=3.0, help="pixel size (Å)")
    ap.add_argument("--classes", type=int, default=10, help="K")
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--max-corr", type=float, default=0.7, help="max aligned correlation between views")
    ap.add_argument("--max-res", type=float, default=8.0, help="resolution limit of both methods (Å)")
    ap.add_argument("--oem-iter", type=int, default=20, help="cryodag online-EM iterations")
    ap.add_argument("--batch-per-class", type=int, default=100, help="cryodag O-EM batch size per class")
    ap.add_argument("--relion-iter", type=int, default=25)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="RELION --j")
    common_args(ap)
    args = ap.parse_args()
    root = start(args, "class2d_bench_")
    print(f"settings: {args.particles} particles, {args.views} views, box {args.box} px, "
          f"{args.pixel:g} Å/px, SNR {args.snr:g}, K {args.classes}, max res {args.max_res:g} Å, "
          f"cryodag {args.oem_iter} O-EM iterations x {args.batch_per_class * args.classes} particles + 1 full, "
          f"RELION {args.relion_iter} iterations, --j {args.threads}, seed {args.seed}; dir {root}")
    ps, view = make_dataset(args, root)

    rows: list[tuple[str, str, np.ndarray, float]] = []
    cls, wall = run_cryodag(args, root, ps)
    rows.append(("cryodag class_2d", f"{args.oem_iter} O-EM + 1 full", cls, wall))
    print(f"cryodag: {wall:.1f} s")
    if not args.skip_relion:
        cls, wall = classify_relion(args, root, ps)
        rows.append(("RELION 3.1 relion_refine", str(args.relion_iter), cls, wall))
        print(f"RELION: {wall:.1f} s")

    t_relion = rows[1][3] if len(rows) > 1 else float("nan")
    print("\n| method | particles | box | K | iterations | wall time (s) | purity | ARI | views found "
          "| speed-up vs RELION |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, iters, cls, wall in rows:
        speed = f"{t_relion / wall:.1f}x" if np.isfinite(t_relion) else "n/a"
        print(f"| {name} | {args.particles:,} | {args.box} | {args.classes} | {iters} | {wall:.1f} "
              f"| {purity(cls, view):.3f} | {ari(cls, view):.3f} | {views_covered(cls, view)}/{args.views} "
              f"| {speed} |")


if __name__ == "__main__":
    main()
