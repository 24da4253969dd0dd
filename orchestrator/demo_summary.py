"""`flow summary`: the results of a workflow run on the simulated `demo` dataset against its truth.

The truth is the dataset the `import_particles` job (source demo) simulated into its job
directory (`demo_source/truth/`: particles.npz, volumes/*.mrc). Particles of every later job are
matched to truth rows by micrograph and pick coordinates (columns every job keeps). Checks
(issue 7): heterogeneous refinement or 3D classification separates the states (ARI >= 0.8 on
the good particles); the consensus map aligned to the truth (both hands) reaches FSC 0.5 at
<= 2 x the pixel-limited resolution of its working box (4 x its pixel size; the row also gives
the consensus pose errors against the truth, in the frame and hand fitted to the poses); a 3DVA latent
correlates with the flexible-domain coordinate t (|corr| >= 0.8; every latent is listed: when
the consensus mixes the states, latent 1 usually follows the discrete change, not t).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobs.artifacts import Artifact, ParticleSet, VolumeSet
from jobs.io.star import ParticleTables, read_star
from jobs.particles import poses_3d, read_tables
from jobs.volumes import read_map, read_maps
from jobs.working_set import working_geometry
from kernels.clustering import adjusted_rand_index
from kernels.fourier import fourier_crop
from kernels.fsc import fsc, resolution_at
from kernels.rotations import errors_in_best_frame
from kernels.volume_align import align_volume
from orchestrator.store import Store
from orchestrator.workflow import Workflow

ARI_MIN, CORR_MIN, FSC_LIMIT_FACTOR = 0.8, 0.8, 4.0


@dataclass
class Row:
    """One line of the summary: job, type, what was found, its check ('PASS name' / 'FAIL name'; for
    hetero_refine and class_3d only 'ARI >= 0.8' / 'ARI < 0.8', one of the two ways to pass the
    "(all)" states check; '' without one), the number it tests (ARI, FSC-to-truth resolution in Å,
    best |corr|; None without a check) and the job's run time (s)."""

    job: str
    type: str
    result: str
    check: str = ""
    seconds: float | None = None
    value: float | None = None


@dataclass
class Truth:
    """The demo dataset's truth per STAR row of the simulation (N rows) and its state maps."""

    state: np.ndarray  # (N,) true state, -1 for junk
    t: np.ndarray  # (N,) flexible-domain coordinate in [-1, 1]
    R: np.ndarray  # (N, 3, 3) true poses
    shift: np.ndarray  # (N, 2) true shifts, px of the data
    kind: np.ndarray  # (N,) 0 particle, 1 noise junk, 2 blob junk
    duplicate: np.ndarray  # (N,) bool: a duplicate pick
    codes: pd.Series  # pick code (micrograph, x, y) -> truth row
    mics: dict[str, int]  # micrograph file name -> index
    maps: list[np.ndarray]  # state maps (D, D, D)

    @staticmethod
    def load(source: Path) -> Truth:
        z = np.load(source / "truth/particles.npz")
        info = json.loads((source / "truth/info.json").read_text())
        names = read_star(source / "micrographs_ctf.star")["micrographs"]["rlnMicrographName"]
        codes = _codes(z["micrograph"], z["coordinates"][:, 0], z["coordinates"][:, 1])
        maps = [read_map(source / f"truth/volumes/state_{s:02d}.mrc", "truth map")
                for s in range(len(info["state_counts"]))]
        return Truth(state=z["state"], t=z["t"], R=z["matrices"], shift=z["shifts_px"], kind=z["kind"],
                     duplicate=z["duplicate_of"] >= 0,
                     codes=pd.Series(np.arange(len(codes)), index=codes),
                     mics={Path(n).name: i for i, n in enumerate(names)}, maps=maps)

    def rows(self, p: pd.DataFrame) -> np.ndarray:
        """Truth row of each particle of the table ``p`` (N_p,) by micrograph and coordinates."""
        mic = np.array([self.mics[Path(n).name] for n in p["rlnMicrographName"]])
        codes = _codes(mic, p["rlnCoordinateX"].to_numpy(float), p["rlnCoordinateY"].to_numpy(float))
        return self.codes.loc[codes].to_numpy()


def _codes(mic: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (np.asarray(mic, np.int64) * 100_000 + np.rint(x).astype(np.int64)) * 100_000 + np.rint(y).astype(np.int64)


def _ari(cls: np.ndarray, rows: np.ndarray, truth: Truth) -> float:
    good = truth.state[rows] >= 0
    return adjusted_rand_index(cls[good], truth.state[rows][good])


def _classes(t: ParticleTables, rows: np.ndarray, truth: Truth) -> tuple[str, float]:
    """'class k: size (state s x%, junk y%)' per class and the ARI of the classes vs the states."""
    cls = t.numeric("rlnClassNumber").astype(np.int64)
    parts = []
    for k in np.unique(cls):
        st = truth.state[rows[cls == k]]
        junk = float(np.mean(st < 0))
        good = st[st >= 0]
        top = np.bincount(good).argmax() if good.size else -1
        share = float(np.mean(good == top)) if good.size else 0.0
        parts.append(f"{k}: {np.sum(cls == k)} (state {top} {100 * share:.0f}%, junk {100 * junk:.0f}%)")
    ari = _ari(cls, rows, truth)
    return "; ".join(parts) + f"; ARI vs states {ari:.3f}", ari


def _junk_line(rows_in: np.ndarray, rows_out: np.ndarray, truth: Truth) -> str:
    junk_in, junk_out = int(np.sum(truth.kind[rows_in] > 0)), int(np.sum(truth.kind[rows_out] > 0))
    good_in, good_out = int(np.sum(truth.kind[rows_in] == 0)), int(np.sum(truth.kind[rows_out] == 0))
    return (f"kept {rows_out.size} of {rows_in.size}: junk {junk_in} -> {junk_out} "
            f"({100 * (1 - junk_out / max(junk_in, 1)):.0f}% removed), good particles {good_in} -> {good_out}")


def _fit_to_truth(vol: np.ndarray, D: int, a: float, rows: np.ndarray, truth: Truth) -> tuple[float, float]:
    """(FSC 0.5 resolution Å, real-space corr) of a map (box, box, box) against the
    particle-weighted truth of ``rows``, aligned (both hands), both Fourier-cropped to box D
    (a Å/px)."""
    st = truth.state[rows]
    weights = np.bincount(st[st >= 0], minlength=len(truth.maps)).astype(np.float64)
    ref = np.tensordot(weights / weights.sum(), np.stack(truth.maps), axes=1).astype(np.float32)

    def crop(v: np.ndarray) -> np.ndarray:
        return fourier_crop(v, D, ndim=3) if v.shape[-1] > D else v

    vol, ref = crop(vol), crop(ref)
    fit = align_volume(ref, vol, order=1)
    return resolution_at(fsc(vol, fit.volume), 0.5, D, a), fit.corr


def _consensus(job: Any, vs: VolumeSet, project: Path, rows: np.ndarray, truth: Truth) -> tuple[str, float, bool]:
    """FSC (unmasked) and real-space correlation of the consensus map with the particle-weighted
    truth (aligned, both hands) in the refinement's working box: text, FSC-0.5 resolution (Å),
    whether it is within the limit."""
    box = vs.box if job.params.get("refinement_box_size") is None else min(vs.box, job.params["refinement_box_size"])
    D = box - box % 2
    a = vs.box * vs.pixel_size / D
    res, corr = _fit_to_truth(read_maps(vs, project)[0], D, a, rows, truth)
    limit, data_limit = FSC_LIMIT_FACTOR * a, FSC_LIMIT_FACTOR * vs.pixel_size
    gs = vs.volumes[0].resolution_A
    text = (f"{len(rows)} particles; GS-FSC {gs:.2f} Å (0.143); FSC to truth {res:.2f} Å (0.5; box {D} at "
            f"{a:.3g} Å/px: limit {limit:.1f} Å; at the data's {vs.pixel_size:.3g} Å/px the limit would be "
            f"{data_limit:.1f} Å); aligned corr with truth {corr:.3f}")
    return text, res, res <= limit


def _pose_errors(t: ParticleTables, rows: np.ndarray, truth: Truth) -> str:
    """Angular errors of the good particles' poses against the truth, in the frame (and hand)
    fitted to the poses (``kernels.rotations.errors_in_best_frame``)."""
    good = truth.state[rows] >= 0
    err, mirrored = errors_in_best_frame(poses_3d(t, 1.0)[0][good], truth.R[rows][good])
    return (f"poses vs truth: median error {np.median(err):.1f}°, {np.mean(err < 15):.0%} within 15°, "
            f"{np.mean(err > 150):.0%} flipped (> 150°){', other hand' if mirrored else ''}")


def _ab_initio_map(job: Any, vs: VolumeSet, project: Path, rows: np.ndarray, truth: Truth) -> str:
    """The 1-class ab-initio map against the truth in the job's working box."""
    D, a, r = working_geometry(vs.box, vs.pixel_size, job.params["max_res_A"])
    res, corr = _fit_to_truth(read_maps(vs, project)[0], D, a, rows, truth)
    return f"map: FSC to truth {res:.1f} Å (0.5; band limit {D * a / r:.1f} Å), aligned corr with truth {corr:.3f}"


def latent_correlations(z: np.ndarray, t: np.ndarray) -> list[float]:
    """|corr(z_k, t)| (K,) of latents z (N, K) with the true coordinate t (N,)."""
    return [abs(float(np.corrcoef(z[:, k], t)[0, 1])) for k in range(z.shape[1])]


def _latents(t: ParticleTables, rows: np.ndarray, truth: Truth) -> tuple[str, float]:
    """|corr(latent k, t)| over the good particles for every 3DVA component; the best of them."""
    p = t.particles
    good = truth.state[rows] >= 0
    names = sorted((c for c in p if c.startswith("cdagLatent") and c[10:].isdigit()), key=lambda c: int(c[10:]))
    z = np.stack([p[c].to_numpy(float) for c in names], axis=1)
    corr = latent_correlations(z[good], truth.t[rows][good])
    best = int(np.argmax(corr))
    return f"|corr(latent k, t)| = {', '.join(f'{c:.3f}' for c in corr)} (best: latent {best + 1})", corr[best]


def _check(name: str, ok: bool) -> str:
    return f"{'PASS' if ok else 'FAIL'} {name}"


def _separation(ari: float) -> str:
    """The check cell of a classification job: not a verdict (the "(all)" states row is)."""
    return f"ARI {'>=' if ari >= ARI_MIN else '<'} {ARI_MIN}"


def summarise(store: Store, wf: Workflow) -> list[Row]:
    """The summary rows of the workflow's finished jobs (module doc); ValueError without a demo import."""
    project = store.project_dir
    done = {n: j for n in wf.order if (j := store.job(wf.nodes[n].key)) is not None and j.status == "done"}
    outs = {n: {a.slot: Artifact.load(a.handle) for a in store.artifacts_of(j.key)} for n, j in done.items()}
    imports = [n for n in done if wf.nodes[n].type == "import_particles" and done[n].params.get("source") == "demo"]
    if not imports:
        raise ValueError(f"no finished import_particles job with source 'demo' in workflow '{wf.name}'")
    truth = Truth.load(project / done[imports[0]].directory / "demo_source")
    tables = {n: {s: read_tables(a, project) for s, a in o.items() if isinstance(a, ParticleSet)}
              for n, o in outs.items()}
    rows = {n: {s: truth.rows(t.particles) for s, t in ts.items()} for n, ts in tables.items()}

    def upstream(name: str, slot: str = "particles") -> np.ndarray:
        ref = wf.nodes[name].inputs[slot]
        return rows[ref.job][ref.slot]

    table: list[Row] = []
    aris: list[float] = []  # of the hetero_refine and class_3d jobs
    for name in done:
        node, out, r, p = wf.nodes[name], outs[name], rows[name].get("particles"), tables[name].get("particles")
        row = Row(name, node.type, "", seconds=done[name].duration_s)
        if node.type == "import_particles":
            row.result = (f"{r.size} particles: {int(np.sum(truth.kind[r] == 0) - truth.duplicate[r].sum())} good, "
                          f"{int(np.sum(truth.kind[r] == 1))} noise junk, {int(np.sum(truth.kind[r] == 2))} blob junk, "
                          f"{int(truth.duplicate[r].sum())} duplicate picks")
        elif node.type == "remove_duplicates":
            before = upstream(name)
            row.result = (f"removed {before.size - r.size}; duplicate picks left "
                          f"{int(truth.duplicate[r].sum())} of {int(truth.duplicate[before].sum())}")
        elif node.type == "class_2d":
            cls = p.numeric("rlnClassNumber").astype(np.int64)
            junk = [float(np.mean(truth.kind[r[cls == k]] > 0)) for k in np.unique(cls)]
            row.result = (f"{out['class_averages'].num_classes} classes: {sum(j > 0.5 for j in junk)} mostly junk "
                          f"(> 50%), {sum(j <= 0.5 for j in junk)} mostly particles")
        elif node.type == "select_2d":
            row.result = f"{out['class_averages'].num_classes} classes, " + _junk_line(upstream(name), r, truth)
        elif node.type in ("ab_initio", "hetero_refine", "class_3d"):
            row.result, ari = _classes(p, r, truth)
            if node.type == "ab_initio" and len(out["volumes"].volumes) == 1:
                row.result += "; " + _ab_initio_map(done[name], out["volumes"], project, r, truth)
            if node.type != "ab_initio":
                row.check, row.value = _separation(ari), ari
                aris.append(ari)
        elif node.type == "select_3d":
            row.result = _junk_line(upstream(name), r, truth)
        elif node.type == "homo_refine":
            row.result, row.value, ok = _consensus(done[name], out["volumes"], project, r, truth)
            row.result += "; " + _pose_errors(p, r, truth)
            row.check = _check("FSC-to-truth", ok)
        elif node.type == "var_3d":
            row.result, corr = _latents(p, r, truth)
            row.check, row.value = _check(f"best |corr| >= {CORR_MIN}", corr >= CORR_MIN), corr
        elif node.type == "var_3d_display":
            row.result = f"{out['volumes'].summary['mode']}: {len(out['volumes'].volumes)} maps"
            if out["volumes"].summary["mode"] == "cluster":
                row.result += "; clusters " + _classes(p, r, truth)[0]
        else:
            row.result = ", ".join(f"{s}: {a.summary}" for s, a in out.items())
        table.append(row)
    table.append(Row("(all)", "", "3 states separated by hetero_refine or class_3d",
                     _check("states", max(aris, default=-1.0) >= ARI_MIN), value=max(aris, default=None)))
    missing = [n for n in wf.order if n not in done]
    if missing:
        table.append(Row("(all)", "", f"not finished: {', '.join(missing)}", "FAIL incomplete"))
    for name in done:
        table.append(Row(name, "directory", str(project / done[name].directory)))
    return table
