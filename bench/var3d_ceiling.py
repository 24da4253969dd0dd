"""What limits 3D variability analysis on a finished demo project: var_3d's engine run again on the
consensus particles with their poses replaced, step by step, by the simulation's truth.

    .venv/bin/python bench/var3d_ceiling.py [--project cryodag_project] [--homo homo] [--var3d var3d]

The project is one that `make demo` (or `flow run` of a workflow on the `demo` dataset) finished;
--homo names its consensus refinement job and --var3d its var_3d job, whose params, mask input
(the consensus refinement's mask) and seed every row uses. Rows, by the poses given to the engine:
  consensus               the refinement's rotations and shifts (what the var_3d job used)
  state frames aligned    each state's consensus rotations turned by the rotation between that
                          state's own best frame and the frame of all good particles, its shifts
                          moved by the difference of the two fitted centres: the consensus
                          without its per-state frame turns and offsets, per-particle errors kept
  true rotations          the true rotations in each state's own frame, consensus shifts
  true rotations + shifts the same with the true shifts (in the consensus frame)
  true poses              the true rotations in the frame of all good particles, true shifts
  shuffled errors         true rotations (own frames) turned by the own-frame rotation error of
                          another particle of the same state (errors < 15 deg, permuted): the
                          errors' sizes kept, their tie to each particle's image and t broken
  errors' t-part          true rotations turned by the per-state least-squares fit of the error
                          (rotation vector, body frame) on [1, t]: what follows t (and the mean)
  errors less t-part      true rotations turned by the error minus the t term of that fit (the
                          mean kept)
Frames: ``kernels.rotations.best_frame`` (rotation and hand); centres: the 3D offset c whose
projections R_i[:2] c best explain consensus shift minus true shift (least squares over
particles with angular error < 15 deg). The mean V0 is reconstructed from each row's poses (a
consensus map made with other poses would put the pose differences into the components).
Columns: best |corr(latent k, t)| over the K latents on the good particles, the same within
each true state, and per state the frame turn (deg) and median angular error in its own frame.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.artifacts import Artifact  # noqa: E402
from jobs.context import JobContext  # noqa: E402
from jobs.particles import poses_3d, read_tables  # noqa: E402
from jobs.var_3d import Params, engine_settings, scale_column  # noqa: E402
from jobs.volumes import read_mask  # noqa: E402
from jobs.working_set import WorkingSet, working_geometry  # noqa: E402
from kernels import var3d as v3  # noqa: E402
from kernels.backend import get_xp  # noqa: E402
from kernels.rotations import (  # noqa: E402
    angular_distance_deg,
    best_frame,
    matrix_to_rotvec,
    mirror_rotations,
    rotvec_to_matrix,
)
from orchestrator.demo_summary import Truth, latent_correlations  # noqa: E402
from orchestrator.store import Store  # noqa: E402

INLIER_DEG = 15.0
#: Seed of the permutation of the "shuffled errors" row.
SHUFFLE_SEED = 0


def frame_of(R: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G (3, 3), errors (N,) deg) of poses R against true poses T already in R's hand."""
    G, _ = best_frame(R, T)
    return G, angular_distance_deg(R, T @ G)


def centre_of(R: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Offset c (3,) px with R_i[:2] c ~ d_i (N, 2) by least squares."""
    c, *_ = np.linalg.lstsq(R[:, :2, :].reshape(-1, 3), d.reshape(-1), rcond=None)
    return c


def error_rows(R: np.ndarray, own_R: np.ndarray, state: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Rotations (N, 3, 3) of the error-dissection rows (module doc) from consensus rotations R and
    true rotations in each state's own frame own_R; particles off by >= 15 deg (and junk) keep R."""
    err = matrix_to_rotvec(np.einsum("nji,njk->nik", own_R, R))  # R = own_R @ rotvec(err), body frame
    off = np.degrees(np.linalg.norm(err, axis=1))
    rng = np.random.default_rng(SHUFFLE_SEED)
    out = {name: R.copy() for name in ("shuffled errors", "errors' t-part", "errors less t-part")}
    for s in np.unique(state[state >= 0]):
        m = np.flatnonzero((state == s) & (off < INLIER_DEG))
        basis = np.stack([np.ones(m.size), t[m]], axis=1)
        coef, *_ = np.linalg.lstsq(basis, err[m], rcond=None)
        fit = basis @ coef
        out["shuffled errors"][m] = own_R[m] @ rotvec_to_matrix(err[rng.permutation(m)])
        out["errors' t-part"][m] = own_R[m] @ rotvec_to_matrix(fit)
        out["errors less t-part"][m] = own_R[m] @ rotvec_to_matrix(err[m] - fit + coef[0])
    return out


def pose_rows(R: np.ndarray, sh: np.ndarray, R_true: np.ndarray, sh_true: np.ndarray, state: np.ndarray,
              t: np.ndarray) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """The rows' (rotations (N, 3, 3), shifts (N, 2) px) and the per-state frame lines (module doc).
    state (N,): true state, -1 for junk (junk keeps its consensus pose in every row); t (N,): true
    flexible-domain coordinate."""
    good = state >= 0
    G, mirrored = best_frame(R[good], R_true[good])
    T = mirror_rotations(R_true) if mirrored else R_true
    err = angular_distance_deg(R[good], T[good] @ G)
    ok = np.flatnonzero(good)[err < INLIER_DEG]
    c = centre_of(R[ok], sh[ok] - sh_true[ok])
    true_sh = sh.copy()
    true_sh[good] = sh_true[good] + np.einsum("nij,j->ni", R[good][:, :2, :], c)
    aligned_R, aligned_sh, own_R, one_R = R.copy(), sh.copy(), R.copy(), R.copy()
    one_R[good] = T[good] @ G
    lines = []
    for s in np.unique(state[good]):
        m = np.flatnonzero(state == s)
        Gs, es = frame_of(R[m], T[m])
        ms = m[es < INLIER_DEG]
        cs = centre_of(R[ms], sh[ms] - sh_true[ms])
        aligned_R[m] = R[m] @ Gs.T @ G
        aligned_sh[m] = sh[m] - np.einsum("nij,j->ni", R[m][:, :2, :], cs - c)
        own_R[m] = T[m] @ Gs
        turn = float(angular_distance_deg(Gs[None], G[None])[0])
        lines.append(f"state {s}: {m.size} particles, frame turn {turn:.1f} deg, offset "
                     f"{np.linalg.norm(cs - c):.2f} px, median error in its own frame {np.median(es):.2f} deg")
    rows = {"consensus": (R, sh), "state frames aligned": (aligned_R, aligned_sh),
            "true rotations": (own_R, sh), "true rotations + shifts": (own_R, true_sh),
            "true poses": (one_R, true_sh)}
    rows.update({name: (rot, sh) for name, rot in error_rows(R, own_R, state, t).items()})
    return rows, lines


def latent_corr(z: np.ndarray, t: np.ndarray, state: np.ndarray) -> tuple[float, list[float]]:
    """Best |corr(z_k, t)| over the good particles and that latent's |corr| within each state."""
    good = state >= 0
    corr = latent_correlations(z[good], t[good])
    k = int(np.argmax(corr))
    return corr[k], [latent_correlations(z[state == s, k : k + 1], t[state == s])[0] for s in np.unique(state[good])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=ROOT / "cryodag_project")
    ap.add_argument("--homo", default="homo", help="consensus refinement job name")
    ap.add_argument("--var3d", default="var3d", help="var_3d job name (its params are used)")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    args = ap.parse_args()
    try:
        store = Store(args.project, create=False)
    except FileNotFoundError as exc:
        sys.exit(str(exc))
    homo, var = store.latest_job_named(args.homo), store.latest_job_named(args.var3d)
    if homo is None or var is None:
        sys.exit(f"{args.project}: no finished jobs named {args.homo!r} and {args.var3d!r}")
    outs = {a.slot: Artifact.load(a.handle) for a in store.artifacts_of(homo.key)}
    ps = outs["particles"]
    imports = [j for j in store.jobs() if j.type == "import_particles" and j.status == "done"
               and j.params.get("source") == "demo"]
    if not imports:
        sys.exit(f"{args.project}: no finished import_particles job with source 'demo' (the truth is needed)")
    truth = Truth.load(store.project_dir / imports[-1].directory / "demo_source")
    tables = read_tables(ps, store.project_dir)
    rows_t = truth.rows(tables.particles)
    params = Params(**var.params)
    D, a, r_max = working_geometry(ps.box, ps.pixel_size, params.target_resolution_A)
    R, sh = poses_3d(tables, a)
    state, t = truth.state[rows_t], truth.t[rows_t]
    rows, lines = pose_rows(R, sh, truth.R[rows_t], truth.shift[rows_t] * ps.pixel_size / a, state, t)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = JobContext(name="var3d_ceiling", project_dir=store.project_dir, work_dir=Path(tmp), final_dir=Path(tmp))
        mask = read_mask(outs["mask"], ctx, D, a, "mask")
        xp = get_xp()
        src = WorkingSet(ps, tables, ctx, D, a, xp)
        alpha = scale_column(tables) if params.per_particle_scale == "input" else None
        print(f"{args.project}: {len(tables)} particles ({int(np.sum(state >= 0))} good), box {D} at {a:.3g} Å/px, "
              f"{params.num_components} components, {params.num_iterations} iterations, seed {params.seed}")
        for line in lines:
            print("  " + line)
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()] or list(rows)
        unknown = [r for r in wanted if r not in rows]
        if unknown:
            sys.exit(f"--rows: unknown {unknown}; rows are {list(rows)}")
        print("\n| poses | best |corr(latent, t)| | per state | wall (s) |\n|---|---|---|---|")
        for name in wanted:
            Rr, shr = rows[name]
            t0 = time.perf_counter()
            eng = v3.Var3D(engine_settings(params, D, a, r_max), xp, Rr, shr, params.seed)
            eng.prepare(src.load, None, mask, alpha, None)
            eng.run(src.load)
            best, per = latent_corr(eng.z, t, state)
            print(f"| {name} | {best:.3f} | {' / '.join(f'{c:.3f}' for c in per)} | {time.perf_counter() - t0:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
