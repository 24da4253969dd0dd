"""3D refinement and 3D classification without alignment: cryodag vs RELION 3.1 `relion_refine` on the same sets.

    .venv/bin/python bench/refine_class3d.py [--box 32 --pixel 5 --particles 600 --per-state 400 ...]

Two simulated sets (tests/kernels/sim3d.py: a pseudo-atom phantom, uniform random poses,
Gaussian shifts, RELION CTF, white noise at a given SNR), normalised to unit noise std and
written once each as a ParticleSet (RELION 3.1 STAR + MRC stack, abinitio_hetero.write_set):
  (a) refinement, a homogeneous set, both started from the true map low-passed to --init-res Å
      (one MRC): cryodag's homo_refine job in-process (kernels/homo.py, job defaults) vs RELION
      3D auto-refine (`--auto_refine --split_random_halves --firstiter_cc --ini_high`, healpix
      order --relion-healpix, local searches from order --relion-local-order: 3, i.e. from a
      3.75 deg step after oversampling, where cryodag starts them; RELION's default 4 adds a
      global search at that step, ~25 min per iteration for 600 particles on the shared
      2-core CPU). Accuracy: the final full map
      superposed onto the truth (kernels/volume_align.py), its FSC-to-truth 0.5 / 0.143
      resolution; the half-map FSC 0.143 resolution (unmasked half maps, computed here for
      both) and each tool's own figure (cryodag: masked, phase-randomisation corrected;
      RELION: rlnCurrentResolution, unmasked); median angular (deg) and shift (px) errors of
      the final poses, read from both tools' particle STAR files, against the true ones.
  (b) classification without alignment, K = --states, a set of as many states whose STAR
      carries the true poses (rlnAngleRot/Tilt/Psi; rlnOriginX/YAngst = -t x pixel size, t the
      shift that moves the content by +t): cryodag kernels/class3d.py (consensus from the
      particles, "simple" start, O-EM then full passes) vs RELION `relion_refine --skip_align`
      with --ref the consensus that `relion_reconstruct` makes from the same STAR (its time is
      counted in RELION's), --ini_high --class-init-res, --tau2_fudge 4, --iter --class-iter.
      Accuracy: ARI of the classes against the true states (and of one E-step with the true
      maps, the best a classifier can do), class fractions.
"true poses" rows: `relion_reconstruct` at the true poses (no search): the FSC-to-truth that
the data allow, and a check that RELION reads the poses, shifts and CTF as they were simulated.
cryodag runs in-process on the NumPy backend (or CuPy); RELION's wall time is the whole
process. RELION gets --threads threads: auto-refine runs the MPI build (`mpirun -n 3`: a
master and one worker of --j threads/2 per half; the sequential build refuses
--split_random_halves), the classification the sequential build with --j threads.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import mrcfile
import numpy as np
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels"), str(ROOT / "bench")]

from abinitio_hetero import device_loader, relion_classes, relion_common, write_set  # noqa: E402
from class2d import common_args, run_relion, start  # noqa: E402
from sim3d import Set3D, simulate  # noqa: E402

from jobs.artifacts import ParticleSet, Volume, VolumeSet  # noqa: E402
from jobs.context import Event, JobContext  # noqa: E402
from jobs.homo_refine import JOB as HOMO  # noqa: E402
from jobs.io.mrc import write_mrc  # noqa: E402
from jobs.io.star import read_star, write_star  # noqa: E402
from kernels import backend  # noqa: E402
from kernels import class3d as c3  # noqa: E402
from kernels.backend import to_host  # noqa: E402
from kernels.clustering import adjusted_rand_index as ari  # noqa: E402
from kernels.fourier import lowpass  # noqa: E402
from kernels.fsc import fsc, resolution_at  # noqa: E402
from kernels.rotations import angular_distance_deg, euler_to_matrix, matrix_to_euler  # noqa: E402
from kernels.volume_align import align_volume  # noqa: E402

# method, iterations, wall s, FSC-truth 0.5 Å, 0.143 Å, half-map 0.143 Å, reported Å, angle err deg, shift err px
RefineRow = tuple[str, str, float, float, float, float, float, float, float]
# method, iterations, wall s, ARI, class fractions (K,)
ClassRow = tuple[str, str, float, float, np.ndarray]


def read_map(path: Path) -> np.ndarray:
    """An MRC map as float32 (D, D, D)."""
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float32)


def with_poses(root: Path, ps: ParticleSet, s: Set3D, name: str) -> ParticleSet:
    """Copy of ps's STAR as <name>.star with the true poses in RELION's columns -> its ParticleSet."""
    blocks = read_star(root / ps.star)
    df = blocks["particles"].copy()
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = matrix_to_euler(s.R)
    df["rlnOriginXAngst"] = -s.shift[:, 0] * s.pixel_size
    df["rlnOriginYAngst"] = -s.shift[:, 1] * s.pixel_size
    path = (root / ps.star).with_name(f"{name}.star")
    write_star(path, {"optics": blocks["optics"], "particles": df})
    return ps.model_copy(update={"star": str(path.relative_to(root))})


def star_poses(data_star: Path, input_star: Path, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    """(R (N, 3, 3), shift t (N, 2) px = -rlnOriginX/YAngst / pixel) in input order, by rlnImageName."""
    data = starfile.read(data_star, always_dict=True)["particles"]
    names = starfile.read(input_star, always_dict=True)["particles"]["rlnImageName"].to_numpy()
    rows = data.set_index("rlnImageName").loc[names]
    R = euler_to_matrix(*(rows[f"rlnAngle{a}"].to_numpy() for a in ("Rot", "Tilt", "Psi")))
    t = -rows[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel
    return R, t


def pose_errors(R: np.ndarray, t: np.ndarray, s: Set3D) -> tuple[float, float]:
    """Median angular (deg) and shift (px) errors against the true poses."""
    return (float(np.median(angular_distance_deg(R, s.R))),
            float(np.median(np.linalg.norm(t - s.shift, axis=1))))


def map_scores(full: np.ndarray, truth: np.ndarray, A: float) -> tuple[float, float]:
    """FSC-to-truth resolution (Å) at 0.5 and 0.143 of full (D, D, D) superposed onto truth
    (align_volume; its pose lattice can leave a few degrees, so the map as it is, already in
    the truth's frame when started from it, is kept if its FSC is higher on average)."""
    a = align_volume(full.astype(np.float32), truth)
    D = truth.shape[-1]
    curves = [to_host(fsc(a.volume, truth)), to_host(fsc(full, truth))]
    keep = int(curves[1][1:].mean() > curves[0][1:].mean())
    angle = float(angular_distance_deg(a.R[None], np.eye(3)[None])[0])
    print(f"  superposition: {angle:.1f} deg, shift {np.round(a.shift, 1)} px, mirrored {a.mirrored}, "
          f"corr {a.corr:.3f}; {'unmoved map kept' if keep else 'superposed map used'}", flush=True)
    return resolution_at(curves[keep], 0.5, D, A), resolution_at(curves[keep], 0.143, D, A)


def half_res(h1: np.ndarray, h2: np.ndarray, A: float) -> float:
    """Unmasked half-map FSC 0.143 resolution (Å)."""
    return resolution_at(to_host(fsc(h1, h2)), 0.143, h1.shape[-1], A)


def reconstruct(root: Path, ps: ParticleSet, out: str) -> tuple[np.ndarray, float]:
    """relion_reconstruct (CTF-corrected) of ps at its STAR poses -> (map (D, D, D), wall time s)."""
    d = root / out
    wall = run_relion(["relion_reconstruct", "--i", ps.star, "--o", f"{out}/map.mrc", "--ctf"], root, d)
    return read_map(d / "map.mrc"), wall


def refine_rows(args: argparse.Namespace, root: Path, s: Set3D, ps: ParticleSet) -> list[RefineRow]:
    """Task (a): reference reconstruction, cryodag homo_refine job and RELION 3D auto-refine."""
    D, A, N = args.box, args.pixel, len(s.state)
    truth = s.maps[0]
    posed = with_poses(root, ps, s, "particles_true_poses")
    vol, wall = reconstruct(root, posed, "reconstruct_refine")
    r05, r0143 = map_scores(vol, truth, A)
    nan = float("nan")
    rows: list[RefineRow] = [("true poses (relion_reconstruct)", "-", wall, r05, r0143, nan, nan, 0.0, 0.0)]

    init = root / "init.mrc"
    write_mrc(init, to_host(lowpass(truth.astype(np.float32), D * A / args.init_res, 2.0)), A)
    job = root / "jobs" / "homo"
    shutil.rmtree(job, ignore_errors=True)  # no resume from an earlier checkpoint
    iters = [0]

    def emit(e: Event) -> None:
        if e["event"] == "log":
            print(f"  cryodag: {e['message']}", flush=True)
        elif e["event"] == "metric" and e["name"] == "band_shells":
            iters[0] += 1

    ctx = JobContext(name="homo", project_dir=root, work_dir=job, final_dir=job, seed=args.seed, emit=emit)
    init_vs = VolumeSet(volumes=[Volume(map=init.name)], box=D, pixel_size=A)
    params = HOMO.params(initial_lowpass_res_A=args.init_res, seed=args.seed)
    t0 = time.perf_counter()
    out = HOMO.run(params, {"particles": ps, "volumes": init_vs}, ctx)
    wall = time.perf_counter() - t0
    v = out["volumes"].volumes[0]
    r05, r0143 = map_scores(read_map(root / v.map), truth, A)
    hr = half_res(read_map(root / v.half_a), read_map(root / v.half_b), A)
    err = pose_errors(*star_poses(root / out["particles"].star, root / ps.star, A), s)
    rows.append(("cryodag homo_refine", f"{iters[0] - 1} + 1 final", wall, r05, r0143, hr, v.resolution_A or nan,
                 *err))
    print(f"cryodag homo_refine: {wall:.1f} s ({wall / N * 1e3:.0f} ms / particle)", flush=True)
    if args.skip_relion:
        return rows

    cmd = relion_common(args, ps.star, "relion_refine/run") + [
        "--auto_refine", "--split_random_halves", "--ref", "init.mrc", "--firstiter_cc", "--ini_high",
        f"{args.init_res:g}", "--auto_local_healpix_order",
        str(args.relion_local_order), "--low_resol_join_halves", "40", "--norm", "--scale"]
    # the sequential build refuses --split_random_halves: a master and one worker per half
    cmd[cmd.index("--j") + 1] = str(max(1, args.threads // 2))
    root_ok = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cmd = ["mpirun", *root_ok, "--oversubscribe", "-n", "3", "relion_refine_mpi", *cmd[1:]]
    out_dir = root / "relion_refine"
    wall = run_relion(cmd, root, out_dir)
    r05, r0143 = map_scores(read_map(out_dir / "run_class001.mrc"), truth, A)
    hr = half_res(*(read_map(out_dir / f"run_half{h}_class001_unfil.mrc") for h in (1, 2)), A)
    model = starfile.read(out_dir / "run_model.star", always_dict=True)["model_general"]
    reported = float(np.asarray(model["rlnCurrentResolution"]).ravel()[0])
    log = (out_dir / "log.txt").read_text(errors="replace")
    n_it = max(int(n) for n in re.findall(r"Auto-refine: Iteration= *(\d+)", log))
    err = pose_errors(*star_poses(out_dir / "run_data.star", root / ps.star, A), s)
    rows.append(("RELION 3.1 3D auto-refine", f"{n_it - 1} + 1 final", wall, r05, r0143, hr, reported, *err))
    print(f"RELION auto-refine: {wall:.1f} s ({wall / N * 1e3:.0f} ms / particle), {n_it} iterations", flush=True)
    return rows


def oracle_ari(s: Set3D, map_scale: float) -> float:
    """ARI of one E-step with the true maps (x map_scale: the images' normalisation), poses,
    noise and class fractions: the best a classifier can do on the set."""
    D, K = s.images.shape[-1], s.maps.shape[0]
    o = c3.Class3D(c3.Settings(n_classes=K, D=D, pixel_size=s.pixel_size, r_max=D // 2 - 1, r_init=1.0), np,
                   s.R, s.shift, seed=0)
    o.vols = (s.maps * map_scale).astype(np.float32)
    o.sigma2 = np.full(D // 2, D * D * s.noise_var / 2)
    o.pi = np.bincount(s.state, minlength=K) / s.state.size
    idx = np.arange(s.state.size)
    return ari(o.posteriors(*s.load(idx, o.band), idx).argmax(axis=1), s.state)


def class_rows(args: argparse.Namespace, root: Path, s: Set3D, ps: ParticleSet, xp: ModuleType,
               map_scale: float) -> list[ClassRow]:
    """Task (b): E-step oracle, cryodag 3D classification and RELION --skip_align, all at the true poses."""
    D, A, K, N = args.box, args.pixel, args.states, len(s.state)
    posed = with_poses(root, ps, s, "particles_true_poses")
    st = c3.Settings(n_classes=K, D=D, pixel_size=A, r_max=D // 2 - 1, r_init=D * A / args.class_init_res,
                     batch_per_class=args.c3_batch, similarity_end=args.c3_similarity_end)
    load = device_loader(s, xp)
    t0 = time.perf_counter()
    eng = c3.Class3D(st, xp, s.R, s.shift, seed=args.seed)
    eng.prepare(load)
    eng.run(load)
    wall = time.perf_counter() - t0
    cls = eng.cls
    truth = np.bincount(s.state, minlength=K) / N
    rows: list[ClassRow] = [
        ("true maps (E-step oracle)", "1", float("nan"), oracle_ari(s, map_scale), truth),
        ("cryodag class3d", f"{eng.n_oem} O-EM + {eng.n_full} full", wall, ari(cls, s.state),
         np.bincount(cls, minlength=K) / N)]
    print(f"cryodag class3d: {wall:.1f} s, ARI {rows[1][3]:.3f} (oracle {rows[0][3]:.3f})", flush=True)
    if args.skip_relion:
        return rows

    mix = np.tensordot(np.bincount(s.state, minlength=K) / N, s.maps, axes=1).astype(np.float32)
    cons, t_rec = reconstruct(root, posed, "reconstruct_class")
    r05, _ = map_scores(cons, mix, A)
    print(f"consensus (relion_reconstruct at the true poses): FSC to the state mixture 0.5 at {r05:.1f} Å, "
          f"{t_rec:.1f} s", flush=True)
    cmd = relion_common(args, posed.star, "relion_class3d/run") + [
        "--skip_align", "--ref", "reconstruct_class/map.mrc", "--firstiter_cc", "--ini_high",
        f"{args.class_init_res:g}", "--K", str(K), "--iter", str(args.class_iter), "--tau2_fudge", "4",
        "--norm", "--scale"]
    out_dir = root / "relion_class3d"
    wall = run_relion(cmd, root, out_dir) + t_rec
    last = sorted(out_dir.glob("run_it*_data.star"))[-1]
    cls, _ = relion_classes(last, root / posed.star)
    rows.append(("RELION 3.1 --skip_align", str(args.class_iter), wall, ari(cls, s.state),
                 np.bincount(cls, minlength=K) / N))
    print(f"RELION --skip_align: {wall:.1f} s ({last.name}), ARI {rows[-1][3]:.3f}", flush=True)
    return rows


def fmt(x: float, spec: str = ".1f") -> str:
    """A number, or n/a when not finite."""
    return format(x, spec) if np.isfinite(x) else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--box", type=int, default=32, help="box (px)")
    ap.add_argument("--pixel", type=float, default=5.0, help="pixel size (Å)")
    ap.add_argument("--particles", type=int, default=600, help="homogeneous set for refinement")
    ap.add_argument("--snr", type=float, default=0.5, help="SNR of the homogeneous set")
    ap.add_argument("--init-res", type=float, default=35.0, help="low-pass of the refinement start map (Å)")
    ap.add_argument("--states", type=int, default=3, choices=(2, 3), help="states of the classification set = K")
    ap.add_argument("--per-state", type=int, default=400, help="particles per state")
    ap.add_argument("--snr-class", type=float, default=0.05, help="SNR of the classification set")
    ap.add_argument("--class-init-res", type=float, default=40.0, help="low-pass of the initial classes (Å)")
    ap.add_argument("--c3-batch", type=int, default=200, help="cryodag O-EM batch per class")
    ap.add_argument("--c3-similarity-end", type=int, default=4, help="cryodag class similarity annealed by then")
    ap.add_argument("--class-iter", type=int, default=25, help="RELION --iter of the classification")
    ap.add_argument("--relion-healpix", type=int, default=2, help="RELION --healpix_order of auto-refine")
    ap.add_argument("--relion-local-order", type=int, default=3,
                    help="RELION --auto_local_healpix_order (3: local from 3.75 deg as cryodag; RELION's default 4)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="RELION threads in all")
    ap.add_argument("--tasks", default="refine,class", help="comma-separated subset of refine,class")
    common_args(ap)
    args = ap.parse_args()
    root = start(args, "refine_class3d_bench_")
    xp = backend.get_xp()
    tasks = set(args.tasks.split(","))
    D, A = args.box, args.pixel
    print(f"settings: box {D} px, {A:g} Å/px (Nyquist {2 * A:g} Å), seed {args.seed}, RELION threads "
          f"{args.threads}; dir {root}\n"
          f"  (a) {args.particles} particles, SNR {args.snr:g}, start map at {args.init_res:g} Å; RELION "
          f"--healpix_order {args.relion_healpix}, local searches from order {args.relion_local_order}, offsets 3 px "
          "range / 2 px step\n"
          f"  (b) {args.states} x {args.per_state} particles, SNR {args.snr_class:g}, K {args.states}, initial "
          f"classes at {args.class_init_res:g} Å; cryodag O-EM batch {args.c3_batch} per class; RELION "
          f"{args.class_iter} iterations", flush=True)
    ref_rows: list[RefineRow] = []
    cl_rows: list[ClassRow] = []
    if "refine" in tasks:
        s = simulate([args.particles], D=D, pixel_size=A, snr=args.snr, seed=args.seed + 5)
        ref_rows = refine_rows(args, root, s, write_set(root, "sim_refine", s))
    if "class" in tasks:
        s = simulate([args.per_state] * args.states, D=D, pixel_size=A, snr=args.snr_class, seed=args.seed + 1)
        scale = 1.0 / np.sqrt(s.noise_var)  # write_set normalises the images to unit noise
        cl_rows = class_rows(args, root, s, write_set(root, "sim_class", s), xp, scale)

    if ref_rows:
        t_rel = {m: w for m, _, w, *_ in ref_rows}.get("RELION 3.1 3D auto-refine", float("nan"))
        print(f"\n(a) refinement, {args.particles:,} particles, box {D}, {A:g} Å/px\n"
              "| method | iterations | wall time (s) | ms / particle | FSC-to-truth 0.5 (Å) | FSC-to-truth 0.143 (Å) "
              "| half-map FSC 0.143 (Å) | reported resolution (Å) | median angular error (deg) "
              "| median shift error (px) | speed-up vs RELION |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for m, it, w, r05, r0143, hr, rep, ang, dt in ref_rows:
            ref = m.startswith("true")
            speed = "n/a" if ref or not np.isfinite(t_rel) else f"{t_rel / w:.1f}x"
            print(f"| {m} | {it} | {w:.1f} | {w / args.particles * 1e3:.1f} | {r05:.1f} | {r0143:.1f} | {fmt(hr)} "
                  f"| {fmt(rep)} | {'0 (truth)' if ref else f'{ang:.2f}'} | {'0 (truth)' if ref else f'{dt:.2f}'} "
                  f"| {speed} |")
    if cl_rows:
        N = args.states * args.per_state
        t_rel = {m: w for m, _, w, *_ in cl_rows}.get("RELION 3.1 --skip_align", float("nan"))
        print(f"\n(b) classification without alignment, {N:,} particles ({args.states} equal states), box {D}, "
              f"{A:g} Å/px, K {args.states}\n"
              "| method | iterations | wall time (s) | ms / particle | ARI | class fractions | speed-up vs RELION |")
        print("|---|---|---|---|---|---|---|")
        for m, it, w, score, frac in cl_rows:
            speed = f"{t_rel / w:.1f}x" if np.isfinite(t_rel * w) else "n/a"
            print(f"| {m} | {it} | {fmt(w)} | {fmt(w / N * 1e3)} | {score:.3f} "
                  f"| {' / '.join(f'{f:.2f}' for f in frac)} | {speed} |")


if __name__ == "__main__":
    main()
