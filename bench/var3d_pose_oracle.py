"""How well can any 3DVA recover the demo's motion coordinate t when the poses come from the same
images? The §11.4 oracle rho = sqrt(var t / (var t + mean 1/q_i)), q_i = ||C P_i dV/dt||^2 / sigma^2,
assumes the true poses. A consensus refinement instead fits each particle's pose (3 rotation
angles, 2 shifts) to its image, and whatever part of C P_i dV/dt lies in the span of the pose
derivatives of the particle's own image is taken by the pose, not by the latent. In the linear
regime with a flat pose prior, a fit of the pose against the particle's own map on this band,
first (a consensus) or jointly with the latent (var_3d's pose freedom), leaves the information
q_perp,i = q_i - g_i^T G_i^{-1} g_i on t (g: inner products of the motion signal with the pose
derivatives, G: their Gram matrix; the motion derivative is taken at t = 0, as the §11.4 oracle's).

    .venv/bin/python bench/var3d_pose_oracle.py [--preset demo] [--seeds 0,1,...] [--res-A 14]

For each realization (the preset's phantom and particles for that seed, as `import_particles`
simulates them; nothing is written), over the full band and to --res-A (var_3d's band in the
demo), columns: rho with the true poses (`true`, equal to info.json's rho_oracle over the full
band) and with the poses fitted (`rot`: rotations only, `pose`: rotations + shifts); `bayes_*`:
the same information as the correlation of a posterior-mean latent with t (Gaussian prior of
variance v = var t: rho^2 = mean_i w_i, w_i = q_i v / (1 + q_i v); the §11.4 formula equals it
for equal q_i and is lower when q_i varies, as views that hardly see the motion count fully in
mean 1/q_i while a posterior mean shrinks their latents instead); `kept`: the
median of q_perp / q; `crlb_deg`: the median Cramér-Rao bound on the rotation error (root of the
trace of the rotations' block of the inverse pose information with t known, deg). Good particles of all
states; sigma^2 = 1 at the data's scale (SNR as simulated). The bound assumes the particle's own
map is known: a consensus fitted against one average of the states may err more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import simulated_dataset as sd  # noqa: E402
from kernels.fourier import rfft2c  # noqa: E402
from kernels.phantom import (  # noqa: E402
    apply_ctf,
    disk_signal_variance,
    half_plane_weights,
    particle_atoms,
    project_atoms,
)
from kernels.rotations import rotvec_to_matrix  # noqa: E402

#: Finite-difference half-step of the rotation derivatives (rad).
EPS = np.radians(0.5)


def weighted_fourier(images: np.ndarray, ctf: np.ndarray, r_max: float) -> np.ndarray:
    """Real vectors (N, 2 M) whose dot products are the noise-weighted inner products of the
    CTF-modulated images (N, D, D) over 0 < |k| < r_max (unit real-space noise variance; as
    ``phantom.noise_weighted_power``)."""
    D = images.shape[-1]
    w = half_plane_weights(D, r_max) / (D * D)
    keep = w > 0
    v = (rfft2c(images) * ctf)[:, keep] * np.sqrt(w[keep])
    return np.concatenate([v.real, v.imag], axis=1)


def shift_derivatives(images: np.ndarray) -> list[np.ndarray]:
    """d image / d shift along x and y (2 x (N, D, D)), by the Fourier shift theorem."""
    D = images.shape[-1]
    F = np.fft.fft2(images)
    k = np.fft.fftfreq(D)
    return [np.fft.ifft2(F * (2j * np.pi * k[None, :])).real, np.fft.ifft2(F * (2j * np.pi * k[:, None])).real]


def information(vecs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q, q_perp to the first 3 pose columns (rotations) and to all 5, and the trace of the
    rotations' Cramér-Rao covariance (rad^2, unit scale), per particle, for vecs = [motion,
    rot x 3, shift x 2] each (N, L)."""
    V = np.stack(vecs, axis=1)  # (N, 6, L)
    G = np.einsum("nal,nbl->nab", V, V)
    q = G[:, 0, 0]

    def perp(n_pose: int) -> np.ndarray:
        g = G[:, 0, 1:1 + n_pose]
        Gp = G[:, 1:1 + n_pose, 1:1 + n_pose]
        return q - np.einsum("na,na->n", g, np.linalg.solve(Gp, g[..., None])[..., 0])

    crlb = np.einsum("naa->n", np.linalg.inv(G[:, 1:, 1:])[:, :3, :3])
    return q, perp(3), perp(5), crlb


def motion_information(p: sd.Preset, seed: int, res_list: list[float | None]
                       ) -> tuple[np.ndarray, float, float, dict[float | None, list[np.ndarray]]]:
    """(good rows (G,) of the realization's STAR, data scale^2, var t over them, {band: [q, q_rot,
    q_pose, crlb]} each (G,) at unit scale) for one seed; band: resolution in Å (None: full band)."""
    model, plan = sd._model(p, seed), sd._plan(p, seed)
    D = p.box
    radius = sd._particle_radius(model, p)
    good = np.flatnonzero((plan.kind == 0) & (plan.duplicate_of < 0))
    var1 = np.zeros(len(plan.mic))
    infos = {res: [np.zeros(len(plan.mic)) for _ in range(4)] for res in res_list}
    turns = [rotvec_to_matrix(s * EPS * np.eye(3)[j]) for j in range(3) for s in (1, -1)]
    for m in range(p.n_micrographs):
        rows = good[plan.mic[good] == m]
        ctf = sd._ctfs(p, plan.mic_defocus[m], len(rows))
        atoms = particle_atoms(model.phantom, model.states, plan.state[rows], plan.t[rows], model.motion)
        R, sh = plan.R[rows], plan.shift[rows]
        own = project_atoms(atoms, R, sh, D).astype(np.float64)
        var1[rows] = disk_signal_variance(apply_ctf(own.astype(np.float32), ctf), radius)
        dv = sd.motion_projections(model, p, plan, rows)
        rot = [project_atoms(atoms, R @ T, sh, D) for T in turns]
        pose = [(rot[2 * j] - rot[2 * j + 1]) / (2 * EPS) for j in range(3)] + shift_derivatives(own)
        for res in res_list:
            r_max = D / 2 if res is None else D * p.pixel_size / res
            vecs = [weighted_fourier(img, ctf, r_max) for img in (dv, *pose)]
            for acc, val in zip(infos[res], information(vecs), strict=True):
                acc[rows] = val
    return (good, float(p.snr / var1[good].mean()), float(plan.t[good].var()),
            {res: [a[good] for a in v] for res, v in infos.items()})


def realization(p: sd.Preset, seed: int, res_list: list[float | None]) -> dict[str, float]:
    """rho with true / fitted poses, median kept fraction of q and median rotation CRLB (deg) for
    one seed, per band (None: full band)."""
    _, scale2, var_t, infos = motion_information(p, seed, res_list)
    out = {}
    for res, (q, q_rot, q_pose, crlb) in infos.items():
        tag = "full" if res is None else f"{res:g}A"
        for name, qq in (("true", q), ("rot", q_rot), ("pose", q_pose)):
            out[f"{tag}:{name}"] = float(np.sqrt(var_t / (var_t + np.mean(1.0 / (scale2 * qq)))))
            w = scale2 * qq * var_t
            out[f"{tag}:bayes_{name}"] = float(np.sqrt(np.mean(w / (1.0 + w))))
        out[f"{tag}:kept"] = float(np.median(q_pose / q))
        out[f"{tag}:crlb_deg"] = float(np.degrees(np.median(np.sqrt(crlb / scale2))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7")
    ap.add_argument("--res-A", type=float, default=14.0)
    a = ap.parse_args()
    p = sd.PRESETS[a.preset]
    res_list: list[float | None] = [None, a.res_A]
    cols = ["full:true"] + [f"{a.res_A:g}A:{n}" for n in ("true", "rot", "pose", "bayes_true", "bayes_pose", "kept",
                                                          "crlb_deg")]
    print("| seed | " + " | ".join(cols) + " | wall (s) |")
    print("|---" * (len(cols) + 2) + "|")
    for seed in (int(s) for s in a.seeds.split(",")):
        t0 = time.perf_counter()
        r = realization(p, seed, res_list)
        print(f"| {seed} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + f" | {time.perf_counter() - t0:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
