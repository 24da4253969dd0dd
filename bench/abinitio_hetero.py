"""3D ab-initio and heterogeneous refinement: cryodag's kernels vs RELION 3.1 `relion_refine` on the same sets.

    .venv/bin/python bench/abinitio_hetero.py [--particles 600 --per-state 200 --box 24 --pixel 8 ...]

Two simulated sets (tests/kernels/sim3d.py: a pseudo-atom phantom, uniform random poses,
Gaussian shifts, RELION CTF, white noise at a given SNR), normalised to unit noise std and
written once each as a ParticleSet (RELION 3.1 STAR + MRC stack):
  (1) ab-initio, K = 1, a homogeneous set: cryodag kernels/abinitio.py (SGD with resolution
      annealing) vs `relion_refine --denovo_3dref --sgd`, both up to the same band (r_max
      shells = box x pixel / r_max Å). Accuracy: the map superposed onto the true map
      (rotation, shift, hand; kernels/volume_align.py), its real-space corr and the FSC-0.5
      shell after low-passing both to r_max.
  (2) heterogeneous refinement, K = 3, a 3-state set, both started from the true maps
      low-passed to --init-res Å: cryodag kernels/hetero.py (online EM + full passes) vs RELION
      3D classification with global alignment (`relion_refine --ref refs.star --K 3`).
      Accuracy: ARI of the classes against the true states; median pose error (deg) against
      the true poses (cryodag: pose in the best class; RELION: rlnAngleRot/Tilt/Psi).
  (3) the two together, K = 3, on the 3-state set of (2): cryodag ab-initio with 3 classes
      (random starts, --ab3-starts whole runs kept by their final log evidence,
      start_choice "final") and hetero refinement from its maps, vs `relion_refine
      --denovo_3dref --sgd --K 3` and RELION 3D classification from its maps (both hetero jobs as
      in (2), start maps low-passed to --init-res Å). Accuracy: the ab-initio ARI (one E-step of all
      particles with the final maps), each class map's best corr with a true state map, and the
      hetero ARI and pose error. Pose errors of (2) and (3) are measured per class in that class's
      best frame and hand (kernels/rotations.errors_in_class_frames): maps from ab-initio have
      their own.
cryodag runs in-process on the NumPy backend (or CuPy) reading the same normalised images;
wall times cover the refinement only (RELION: the whole process). "particle-images" counts
the images each method put through an E-step (cryodag: batches; RELION SGD: its subsets,
RELION EM: N per iteration). RELION samples --healpix_order 1 (30 deg, 15 deg after
oversampling: what RELION itself asks for at 24 Å with a 154 Å particle; order 2 costs ~10x on
this CPU build, double precision) and offsets to 3 px in 2 px steps; cryodag searches
coarse-to-fine from HEALPix order 2 (15 deg) to the order of one Nyquist step at the band
(3.75 deg at r_max 8) with 0.5 px shifts (kernels/refine3d.plan_for).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import mrcfile
import numpy as np
import pandas as pd
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels"), str(ROOT / "bench")]

from class2d import common_args, run_relion, start  # noqa: E402
from sim3d import CS, Q0, VOLTAGE, Set3D, simulate  # noqa: E402

from jobs.artifacts import ParticleSet  # noqa: E402
from jobs.context import JobContext  # noqa: E402
from jobs.io.mrc import write_mrc  # noqa: E402
from jobs.io.star import ParticleTables  # noqa: E402
from jobs.particles import write_particle_set  # noqa: E402
from kernels import abinitio as ab  # noqa: E402
from kernels import backend  # noqa: E402
from kernels import hetero as ht  # noqa: E402
from kernels.backend import to_device, to_host  # noqa: E402
from kernels.clustering import adjusted_rand_index as ari  # noqa: E402
from kernels.fourier import Band, lowpass  # noqa: E402
from kernels.fsc import fsc  # noqa: E402
from kernels.rotations import errors_in_class_frames, euler_to_matrix  # noqa: E402
from kernels.volume_align import align_volume  # noqa: E402

Row = tuple[str, str, str, int, float, str, str, str, str]  # task, method, iters, images, wall, corr, FSC, ARI, pose


def write_set(root: Path, name: str, s: Set3D) -> ParticleSet:
    """Normalise ``s.images`` and ``s.maps`` in place to unit noise std (the maps stay on the
    images' scale: hetero refinement takes its start maps as they are) and write
    jobs/<name>/particles.{star,mrcs}."""
    s.images /= np.float32(math.sqrt(s.noise_var))
    s.maps = s.maps / math.sqrt(s.noise_var)
    s.noise_var = 1.0
    job = root / "jobs" / name
    ctx = JobContext(name=name, project_dir=root, work_dir=job, final_dir=job)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnVoltage": [VOLTAGE], "rlnSphericalAberration": [CS],
                           "rlnAmplitudeContrast": [Q0], "rlnImagePixelSize": [s.pixel_size]})
    parts = pd.DataFrame({"rlnDefocusU": s.defocus[:, 0], "rlnDefocusV": s.defocus[:, 1],
                          "rlnDefocusAngle": s.defocus[:, 2], "rlnOpticsGroup": 1})
    tables = ParticleTables(optics=optics, particles=parts, source=root / f"{name}.star")
    D = s.images.shape[-1]
    return write_particle_set(ctx, "particles", tables, [s.images], D, s.pixel_size)


def sgd_images(log: str) -> int:
    """Particle-images of a RELION SGD run: the subset size of each iteration, read from its log."""
    n, size = 0, 0
    for line in log.replace("\r", "\n").splitlines():
        if m := re.search(r"Setting subset size to (\d+)", line):
            size = int(m.group(1))
        elif "Stochastic Gradient Descent iteration" in line:
            n += size
    return n


def relion_common(args: argparse.Namespace, star: str, out: str) -> list[str]:
    """Flags shared by both RELION jobs (run from the project directory)."""
    return ["relion_refine", "--o", out, "--i", star, "--ctf", "--sym", "C1",
            "--particle_diameter", f"{0.8 * args.box * args.pixel:.0f}", "--flatten_solvent", "--zero_mask",
            "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2", "--oversampling", "1",
            "--healpix_order", str(args.relion_healpix), "--offset_range", "3", "--offset_step", "2",
            "--j", str(args.threads), "--random_seed", str(args.seed + 1)]


def device_loader(s: Set3D, xp: ModuleType) -> ab.Loader:
    """s.load with its (X, C) moved to the backend ``xp``."""
    return lambda idx, band: tuple(to_device(a, xp) for a in s.load(idx, band))  # type: ignore[return-value]


def accuracy(vol: np.ndarray, truth: np.ndarray, r_max: int) -> tuple[float, int]:
    """Superpose vol (D, D, D) onto truth -> (real-space corr, last shell with FSC >= 0.5 at <= r_max)."""
    a = align_volume(vol.astype(np.float32), truth)
    f = to_host(fsc(lowpass(a.volume, r_max, 1.0), lowpass(truth, r_max, 1.0)))
    below = np.flatnonzero(f[1:] < 0.5)
    return a.corr, int(below[0]) if below.size else f.size - 1


def abinitio_rows(args: argparse.Namespace, root: Path, s: Set3D, ps: ParticleSet, xp: ModuleType) -> list[Row]:
    """Task (1): cryodag ab-initio K = 1 and RELION SGD initial model on the homogeneous set."""
    D, A, r = args.box, args.pixel, args.r_max
    st = ab.Settings(n_classes=1, D=D, pixel_size=A, r_init=args.r_init, r_max=r, n_init_iters=args.ab_init_iters,
                     radius_step=0.5, n_final_iters=args.ab_final_iters, batch_size=args.ab_batch,
                     high_lr_iters=args.ab_init_iters, similarity_end=16, shift_extent_px=2.0)
    load = device_loader(s, xp)
    t0 = time.perf_counter()
    eng = ab.AbInitio(st, xp, len(s.state), args.seed)
    eng.initialise(load)
    for t in range(st.n_iterations):
        eng.iterate(t, load)
    wall = time.perf_counter() - t0
    n_img = st.n_iterations * min(st.batch_size, len(s.state))
    rows: list[Row] = []
    corr, shell = accuracy(to_host(eng.vols[0]), s.maps[0], r)
    rows.append(("ab-initio K=1", "cryodag abinitio", str(st.n_iterations), n_img, wall, f"{corr:.3f}",
                 f"{shell} ({D * A / max(shell, 1):.0f} Å)", "n/a", "n/a"))
    print(f"cryodag ab-initio: {wall:.1f} s", flush=True)
    if args.skip_relion:
        return rows
    ini, mid, fin = args.sgd_iters
    cmd = relion_common(args, ps.star, "relion_ab/run") + [
        "--denovo_3dref", "--sgd", "--K", "1", "--sgd_ini_iter", str(ini), "--sgd_inbetween_iter", str(mid),
        "--sgd_fin_iter", str(fin), "--sgd_ini_subset", str(args.sgd_subsets[0]),
        "--sgd_fin_subset", str(args.sgd_subsets[1]), "--sgd_ini_resol", f"{D * A / args.r_init:g}",
        "--sgd_fin_resol", f"{D * A / r:g}", "--sgd_write_iter", str(ini + mid + fin)]
    wall = run_relion(cmd, root, root / "relion_ab")
    last = sorted((root / "relion_ab").glob("run_it*_class001.mrc"))[-1]
    vol = read_maps([last])[0]
    n_img = sgd_images((root / "relion_ab" / "log.txt").read_text(errors="replace"))
    corr, shell = accuracy(vol, s.maps[0], r)
    rows.append(("ab-initio K=1", "RELION 3.1 --denovo_3dref --sgd", str(ini + mid + fin), n_img, wall,
                 f"{corr:.3f}", f"{shell} ({D * A / max(shell, 1):.0f} Å)", "n/a", "n/a"))
    print(f"RELION SGD: {wall:.1f} s ({last.name})", flush=True)
    return rows


def relion_classes(data_star: Path, input_star: Path, complete: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rlnClassNumber - 1 (N,), pose matrices (N, 3, 3)) in input order, mapped by rlnImageName;
    particles absent from data_star get class -1 (an error when ``complete``)."""
    data = starfile.read(data_star, always_dict=True)["particles"]
    inp = starfile.read(input_star, always_dict=True)["particles"]
    order = pd.Series(np.arange(len(inp)), index=inp["rlnImageName"].to_numpy())
    rows = order[data["rlnImageName"].to_numpy()].to_numpy()
    cls, R = np.full(len(inp), -1, np.int64), np.zeros((len(inp), 3, 3))
    cls[rows] = data["rlnClassNumber"].to_numpy() - 1
    R[rows] = euler_to_matrix(*(data[f"rlnAngle{a}"].to_numpy() for a in ("Rot", "Tilt", "Psi")))
    if complete and (cls < 0).any():
        sys.exit(f"{data_star.name}: {int((cls < 0).sum())} particles without a class")
    return cls, R


def pose_error(R: np.ndarray, truth: np.ndarray, cls: np.ndarray) -> str:
    """Median angular distance (deg) of poses (N, 3, 3) from the true ones, each class's particles
    (cls (N,)) in that class's best frame and hand."""
    return f"{float(np.median(errors_in_class_frames(R, truth, cls))):.1f}"


def read_maps(paths: list[Path]) -> np.ndarray:
    """The MRC maps at ``paths`` as one (K, D, D, D) float32 array."""
    out = []
    for path in paths:
        with mrcfile.open(path, permissive=True) as m:
            out.append(np.asarray(m.data, dtype=np.float32))
    return np.stack(out)


def hetero_rows(args: argparse.Namespace, root: Path, s: Set3D, ps: ParticleSet, xp: ModuleType, task: str,
                maps: np.ndarray, relion_maps: np.ndarray) -> list[Row]:
    """cryodag hetero refinement from ``maps`` and RELION 3D classification from ``relion_maps``
    (K, D, D, D), both low-passed to --init-res; the rows are labelled ``task``."""
    D, A, r, K = args.box, args.pixel, args.r_max, maps.shape[0]
    N = len(s.state)
    r0 = D * A / args.init_res
    st = ht.Settings(n_classes=K, D=D, pixel_size=A, r_max=r, r_init=round(r0), batch_per_class=args.het_batch,
                     n_random_iters=0, max_oem_iters=args.het_oem_iters, lr_init=0.5,
                     n_full_iters=args.het_full_iters, shift_extent_px=2.0)
    load = device_loader(s, xp)
    t0 = time.perf_counter()
    het = ht.HeteroRefine(st, xp, N, args.seed)
    het.initialise(maps, load)
    n_img = 0
    for t in range(st.max_oem_iters):
        idx, _, m = het.oem_iteration(t, load)
        n_img += idx.size
        if het.converged(t, m):
            break
    band = Band(D, het.r)
    for _ in range(st.n_full_iters):
        chunks = [np.arange(i, min(i + 500, N)) for i in range(0, N, 500)]
        out = het.full_iteration(((idx, *load(idx, band)) for idx in chunks), band)
        n_img += N
    wall = time.perf_counter() - t0
    rows: list[Row] = [(task, "cryodag hetero", f"{t + 1} O-EM + {st.n_full_iters} full", n_img, wall,
                        "n/a", "n/a", f"{ari(out.cls, s.state):.3f}", pose_error(out.R, s.R, out.cls))]
    print(f"cryodag hetero: {wall:.1f} s, class fractions {np.round(het.pi, 3)}", flush=True)
    if args.skip_relion:
        return rows
    tag = "_".join(task.split()[2:]) or "truth"
    refs, out_dir = root / f"refs_{tag}", root / f"relion_cl3d_{tag}"
    refs.mkdir(exist_ok=True)
    names = []
    for k in range(K):
        write_mrc(refs / f"ref{k + 1}.mrc", to_host(lowpass(relion_maps[k].astype(np.float32), r0, 2.0)), A)
        names.append(f"{refs.name}/ref{k + 1}.mrc")
    starfile.write(pd.DataFrame({"rlnReferenceImage": names}), refs / "refs.star", overwrite=True)
    cmd = relion_common(args, ps.star, f"{out_dir.name}/run") + [
        "--ref", f"{refs.name}/refs.star", "--firstiter_cc", "--ini_high", f"{args.init_res:g}", "--K", str(K),
        "--iter", str(args.relion_iter), "--tau2_fudge", "4", "--norm", "--scale",
        "--strict_highres_exp", f"{D * A / r:g}"]
    wall = run_relion(cmd, root, out_dir)
    last = sorted(out_dir.glob("run_it*_data.star"))[-1]
    cls, R = relion_classes(last, root / ps.star)
    rows.append((task, "RELION 3.1 3D classification", str(args.relion_iter), N * args.relion_iter, wall,
                 "n/a", "n/a", f"{ari(cls, s.state):.3f}", pose_error(R, s.R, cls)))
    print(f"RELION 3D classification: {wall:.1f} s ({last.name}), class fractions "
          f"{np.round(np.bincount(cls, minlength=K) / N, 3)}", flush=True)
    return rows


def abinitio3_rows(args: argparse.Namespace, root: Path, s: Set3D, ps: ParticleSet, xp: ModuleType) -> list[Row]:
    """Task (3): ab-initio K = 3 from random starts on the 3-state set, then hetero refinement
    from its maps; cryodag and RELION (SGD initial model, then 3D classification)."""
    D, A, r, K = args.box, args.pixel, args.r_max, s.maps.shape[0]
    st = ab.Settings(n_classes=K, D=D, pixel_size=A, r_init=args.r_init, r_max=r, n_init_iters=args.ab3_iters[0],
                     radius_step=0.5, n_final_iters=args.ab3_iters[1], batch_size=args.ab_batch,
                     high_lr_iters=args.ab3_iters[0], similarity_end=args.ab3_similarity_end,
                     shift_extent_px=2.0, n_starts=args.ab3_starts, start_choice="final")
    load = device_loader(s, xp)
    idx = np.arange(len(s.state))
    band = Band(D, r)
    t0 = time.perf_counter()
    eng = ab.AbInitio(st, xp, len(s.state), args.seed)
    finals = []
    for m in range(st.n_starts):
        eng.initialise(load, m)
        for t in range(st.n_iterations):
            eng.iterate(t, load)
        finals.append({k: v.copy() for k, v in eng.state().items()})
    best, scores = eng.best_final(finals, load)
    wall = time.perf_counter() - t0
    X, C = load(idx, band)
    aris = []
    for final in finals:  # accuracy of every start, outside the timed run
        eng.load_state(final)
        aris.append(ari(eng.assign(X, C, band).p.argmax(1), s.state))
    eng.load_state(finals[best])
    print(f"cryodag ab-initio K=3: {wall:.1f} s; per start ARI {np.round(aris, 3)}, final log evidence "
          f"{np.round(scores, 3)}: kept start {best + 1}", flush=True)
    maps = to_host(eng.vols)
    corr = " / ".join(f"{max(align_volume(v, m).corr for m in s.maps):.3f}" for v in maps)
    rows: list[Row] = [("ab-initio K=3", f"cryodag abinitio, {st.n_starts} starts", str(st.n_iterations),
                        st.n_starts * st.n_iterations * min(st.batch_size, len(s.state)), wall, corr, "n/a",
                        f"{aris[best]:.3f}", "n/a")]
    relion_maps = maps
    if not args.skip_relion:
        ini, mid, fin = args.sgd_iters
        cmd = relion_common(args, ps.star, "relion_ab3/run") + [
            "--denovo_3dref", "--sgd", "--K", str(K), "--sgd_ini_iter", str(ini), "--sgd_inbetween_iter",
            str(mid), "--sgd_fin_iter", str(fin), "--sgd_ini_subset", str(args.sgd_subsets[0]),
            "--sgd_fin_subset", str(args.sgd_subsets[1]), "--sgd_ini_resol", f"{D * A / args.r_init:g}",
            "--sgd_fin_resol", f"{D * A / r:g}", "--sgd_write_iter", str(ini + mid + fin)]
        wall = run_relion(cmd, root, root / "relion_ab3")
        it = sorted((root / "relion_ab3").glob("run_it*_class001.mrc"))[-1].name.split("_class")[0]
        relion_maps = read_maps([root / "relion_ab3" / f"{it}_class{k + 1:03d}.mrc" for k in range(K)])
        # SGD writes the classes of its last subsets only: the ARI is over those particles
        cls, _ = relion_classes(root / "relion_ab3" / f"{it}_data.star", root / ps.star, complete=False)
        seen = cls >= 0
        corr = " / ".join(f"{max(align_volume(v, m).corr for m in s.maps):.3f}" for v in relion_maps)
        rows.append(("ab-initio K=3", "RELION 3.1 --denovo_3dref --sgd --K 3", str(ini + mid + fin),
                     sgd_images((root / "relion_ab3" / "log.txt").read_text(errors="replace")), wall, corr,
                     "n/a", f"{ari(cls[seen], s.state[seen]):.3f} ({int(seen.sum())} in its last subsets)", "n/a"))
        print(f"RELION SGD K=3: {wall:.1f} s ({it})", flush=True)
    return rows + hetero_rows(args, root, s, ps, xp, "hetero K=3 from ab-initio", maps, relion_maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=600, help="homogeneous set for ab-initio")
    ap.add_argument("--per-state", type=int, default=200, help="particles per state of the 3-state set")
    ap.add_argument("--box", type=int, default=24, help="box (px)")
    ap.add_argument("--pixel", type=float, default=8.0, help="pixel size (Å)")
    ap.add_argument("--snr", type=float, default=1.0, help="SNR of the homogeneous set")
    ap.add_argument("--snr-hetero", type=float, default=3.0, help="SNR of the 3-state set")
    ap.add_argument("--r-max", type=int, default=8, help="band limit of all runs (Fourier shells)")
    ap.add_argument("--r-init", type=int, default=4, help="ab-initio starting band (shells)")
    ap.add_argument("--init-res", type=float, default=30.0, help="low-pass of the start maps for task 2 (Å)")
    ap.add_argument("--ab-batch", type=int, default=150, help="cryodag ab-initio minibatch")
    ap.add_argument("--ab-init-iters", type=int, default=10)
    ap.add_argument("--ab-final-iters", type=int, default=10)
    ap.add_argument("--het-batch", type=int, default=100, help="cryodag hetero O-EM batch per class")
    ap.add_argument("--het-oem-iters", type=int, default=8, help="max cryodag O-EM iterations")
    ap.add_argument("--het-full-iters", type=int, default=1)
    ap.add_argument("--sgd-iters", type=int, nargs=3, default=[10, 20, 10], metavar=("INI", "MID", "FIN"),
                    help="RELION --sgd_ini_iter, --sgd_inbetween_iter, --sgd_fin_iter")
    ap.add_argument("--sgd-subsets", type=int, nargs=2, default=[50, 100], metavar=("INI", "FIN"),
                    help="RELION --sgd_ini_subset, --sgd_fin_subset")
    ap.add_argument("--relion-iter", type=int, default=25, help="RELION 3D classification iterations")
    ap.add_argument("--relion-healpix", type=int, default=1,
                    help="RELION --healpix_order (1: 30 deg, 15 deg after oversampling; 2 costs ~10x)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="RELION --j")
    ap.add_argument("--ab3-iters", type=int, nargs=2, default=[30, 90], metavar=("INIT", "FINAL"),
                    help="task (3): cryodag ab-initio initial and final iterations")
    ap.add_argument("--ab3-starts", type=int, default=3, help="task (3): whole runs from random starts")
    ap.add_argument("--ab3-similarity-end", type=int, default=50,
                    help="task (3): iteration where the class similarity reaches 0")
    ap.add_argument("--tasks", default="abinitio,hetero,abinitio3",
                    help="comma-separated subset of abinitio,hetero,abinitio3")
    common_args(ap)
    args = ap.parse_args()
    root = start(args, "abinitio_hetero_bench_")
    xp = backend.get_xp()
    tasks = set(args.tasks.split(","))
    print(f"settings: box {args.box} px, {args.pixel:g} Å/px, band r_max {args.r_max} shells "
          f"({args.box * args.pixel / args.r_max:g} Å), seed {args.seed}; dir {root}\n"
          f"  (1) {args.particles} particles, SNR {args.snr:g}; cryodag {args.ab_init_iters} + anneal + "
          f"{args.ab_final_iters} iterations x {args.ab_batch}, r_init {args.r_init}; RELION SGD iterations "
          f"{args.sgd_iters}, subsets {args.sgd_subsets}\n"
          f"  (2) 3 x {args.per_state} particles, SNR {args.snr_hetero:g}, start maps at {args.init_res:g} Å; "
          f"cryodag <= {args.het_oem_iters} O-EM x {3 * args.het_batch} + {args.het_full_iters} full; "
          f"RELION {args.relion_iter} iterations\n"
          f"  (3) the set of (2); cryodag ab-initio K=3 {args.ab3_iters[0]} + anneal + {args.ab3_iters[1]} "
          f"iterations x {args.ab_batch}, {args.ab3_starts} starts (kept by final evidence), then hetero as (2); "
          f"RELION SGD K=3 as (1), then 3D classification as (2)\n"
          f"  RELION --j {args.threads}, --healpix_order "
          f"{args.relion_healpix} + oversampling 1, offsets 3 px range / 2 px step", flush=True)
    rows: list[Row] = []
    if "abinitio" in tasks:
        s = simulate([args.particles], D=args.box, pixel_size=args.pixel, snr=args.snr, seed=args.seed + 3)
        rows += abinitio_rows(args, root, s, write_set(root, "sim_homo", s), xp)
    if tasks & {"hetero", "abinitio3"}:
        s = simulate([args.per_state] * 3, D=args.box, pixel_size=args.pixel, snr=args.snr_hetero,
                     seed=args.seed + 1)
        ps = write_set(root, "sim_states", s)
        if "hetero" in tasks:
            rows += hetero_rows(args, root, s, ps, xp, "hetero K=3", s.maps, s.maps)
        if "abinitio3" in tasks:
            rows += abinitio3_rows(args, root, s, ps, xp)

    relion = {task: wall for task, method, _, _, wall, *_ in rows if method.startswith("RELION")}
    print("\n| task | method | iterations | particle-images | wall time (s) | ms / particle-image "
          "| s / particle | aligned corr | FSC 0.5 shell | ARI | median pose error (deg) | speed-up vs RELION |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task, method, iters, n_img, wall, corr, shell, score, pose in rows:
        n = args.particles if task == "ab-initio K=1" else 3 * args.per_state
        speed = f"{relion[task] / wall:.1f}x" if task in relion else "n/a"
        print(f"| {task} | {method} | {iters} | {n_img:,} | {wall:.1f} | {1e3 * wall / n_img:.1f} "
              f"| {wall / n:.3f} | {corr} | {shell} | {score} | {pose} | {speed} |")


if __name__ == "__main__":
    main()
