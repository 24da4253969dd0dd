"""Simulated datasets on disk: formats, counts, SNR, determinism, micrograph geometry."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from jobs.io.star import read_particles_star
from jobs.simulated_dataset import PRESETS, load_model, write_dataset, write_preset
from kernels.ctf import ctf_2d
from kernels.phantom import apply_ctf, particle_atoms, project_atoms
from kernels.rotations import euler_to_matrix


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "tiny"
    write_preset("tiny", out, seed=0, noiseless_micrographs=True)
    return out


def _truth(root: Path) -> tuple[dict, dict]:
    info = json.loads((root / "truth/info.json").read_text())
    return info, dict(np.load(root / "truth/particles.npz"))


def _cut(mic: np.ndarray, xy: np.ndarray, D: int) -> np.ndarray:
    x, y = int(xy[0]), int(xy[1])
    return mic[y - D // 2: y + D // 2, x - D // 2: x + D // 2]


def _read(path: Path) -> tuple[np.ndarray, float]:
    with mrcfile.open(path, permissive=False) as m:
        return np.array(m.data), float(m.voxel_size.x)


def test_tiny_files_readable_and_consistent(tiny: Path) -> None:
    info, tr = _truth(tiny)
    p = PRESETS["tiny"]
    star = starfile.read(tiny / "particles.star")
    optics, parts = star["optics"], star["particles"]
    assert len(parts) == info["n_rows"] == len(tr["state"])
    assert info["n_rows"] == p.n_particles + info["n_duplicates"]
    assert info["n_duplicates"] == round(p.duplicate_fraction * p.n_particles) > 0
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(p.pixel_size)
    assert optics["rlnImageSize"].iloc[0] == p.box
    assert optics["rlnVoltage"].iloc[0] == 300 and optics["rlnAmplitudeContrast"].iloc[0] == 0.1
    idx = parts["rlnImageName"].str.split("@").str[0].astype(int)
    files = parts["rlnImageName"].str.split("@").str[1]
    total = 0
    for f in files.unique():
        data, voxel = _read(tiny / f)
        assert data.dtype == np.float32 and data.shape[1:] == (p.box, p.box)
        assert voxel == pytest.approx(p.pixel_size)
        assert sorted(idx[files == f]) == list(range(1, len(data) + 1))
        total += len(data)
    assert total == len(parts)
    mics = starfile.read(tiny / "micrographs_ctf.star")["micrographs"]
    assert len(mics) == p.n_micrographs == parts["rlnMicrographName"].nunique()
    for name in mics["rlnMicrographName"]:
        data, voxel = _read(tiny / name)
        assert list(data.shape) == info["micrograph_shape"] and voxel == pytest.approx(p.pixel_size)
    # the defocus of a particle is that of its micrograph; Euler and shifts match the truth
    merged = parts.merge(mics, on="rlnMicrographName", suffixes=("", "_mic"))
    assert np.allclose(merged["rlnDefocusU"], merged["rlnDefocusU_mic"])
    R = euler_to_matrix(parts["rlnAngleRot"].to_numpy(), parts["rlnAngleTilt"].to_numpy(),
                        parts["rlnAnglePsi"].to_numpy())
    assert np.abs(R - tr["matrices"]).max() < 1e-4
    # RELION origin = -(content shift): see test_relion_reconstructs_truth
    assert np.allclose(parts["rlnOriginXAngst"] / p.pixel_size, -tr["shifts_px"][:, 0], atol=1e-5)
    assert np.allclose(parts["rlnOriginYAngst"] / p.pixel_size, -tr["shifts_px"][:, 1], atol=1e-5)
    picks = starfile.read(tiny / "Micrographs/mic_0001_pick.star")
    assert len(picks) == (tr["micrograph"] == 0).sum()
    # the project's own reader accepts it
    assert len(read_particles_star(tiny / "particles.star")) == len(parts)
    # volumes: one state (tiny) at the data pixel size
    vol, voxel = _read(tiny / "truth/volumes/state_00.mrc")
    assert vol.shape == (p.box,) * 3 and voxel == pytest.approx(p.pixel_size)
    assert (tr["junk"] == (tr["kind"] > 0)).all() and tr["junk"].sum() == round(0.1 * 300)


def test_snr_matches_request(tiny: Path) -> None:
    """§11.2 SNR measured from the files: clean boxes (noiseless micrographs) vs stack noise."""
    info, tr = _truth(tiny)
    D, radius = info["box"], info["particle_radius_px"]
    g = np.arange(D) - D // 2
    disk = (g[:, None] ** 2 + g[None, :] ** 2) <= radius**2
    parts = starfile.read(tiny / "particles.star")["particles"]
    good = np.flatnonzero((tr["kind"] == 0) & (tr["duplicate_of"] < 0))
    sig, noise = [], []
    for i in good:
        m = tr["micrograph"][i]
        clean = _cut(_read(tiny / f"truth/micrographs_clean/mic_{m + 1:04d}.mrc")[0],
                     tr["coordinates"][i], D)
        k, f = parts["rlnImageName"].iloc[i].split("@")
        with mrcfile.mmap(tiny / f) as s:
            img = np.array(s.data[int(k) - 1])
        sig.append(clean[disk].var())
        noise.append(img - clean)
    snr = np.mean(sig) / np.var(np.asarray(noise))
    assert snr == pytest.approx(PRESETS["tiny"].snr, rel=0.05)
    assert info["snr_measured"] == pytest.approx(PRESETS["tiny"].snr, rel=0.05)


def test_micrograph_boxes_equal_clean_particles(tiny: Path) -> None:
    """A box cut at a recorded coordinate of a noiseless micrograph is the clean particle
    (re-simulated from the saved phantom, pose, shift, CTF and scale); duplicates too."""
    info, tr = _truth(tiny)
    D = info["box"]
    phantom, states, motion = load_model(tiny / "truth")
    rows = np.flatnonzero(tr["kind"] == 0)
    assert (tr["duplicate_of"][rows] >= 0).any()
    atoms = particle_atoms(phantom, states, tr["state"][rows], tr["t"][rows], motion)
    d = tr["defocus"][rows]
    ctf = ctf_2d(D, info["pixel_size"], d[:, 0], d[:, 1], d[:, 2], voltage_kv=300.0,
                 cs_mm=2.7, amplitude_contrast=0.1)
    expect = info["scale"] * apply_ctf(project_atoms(atoms, tr["matrices"][rows],
                                                     tr["shifts_px"][rows], D), ctf)
    mics = {}
    for j, i in enumerate(rows):
        m = tr["micrograph"][i]
        if m not in mics:
            mics[m] = _read(tiny / f"truth/micrographs_clean/mic_{m + 1:04d}.mrc")[0]
        box = _cut(mics[m], tr["coordinates"][i], D)
        assert np.corrcoef(box.ravel(), expect[j].ravel())[0, 1] >= 0.99


def test_stack_is_extraction_of_micrograph(tiny: Path) -> None:
    _, tr = _truth(tiny)
    parts = starfile.read(tiny / "particles.star")["particles"]
    mic = _read(tiny / "Micrographs/mic_0002.mrc")[0]
    stack = _read(tiny / "Particles/stack_0002.mrcs")[0]
    rows = np.flatnonzero(tr["micrograph"] == 1)
    for k, i in enumerate(rows):
        assert parts["rlnImageName"].iloc[i] == f"{k + 1:06d}@Particles/stack_0002.mrcs"
        assert np.array_equal(stack[k], _cut(mic, tr["coordinates"][i], stack.shape[-1]))


def _digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_determinism_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_preset("tiny", tmp_path / "a", seed=5)
    time.sleep(1.1)  # a time stamp in any file header would now differ
    b = write_preset("tiny", tmp_path / "b", seed=5)
    c = write_preset("tiny", tmp_path / "c", seed=6)
    assert _digest(Path(a["out_dir"])) == _digest(Path(b["out_dir"]))
    assert _digest(Path(a["out_dir"]))["particles.star"] != _digest(Path(c["out_dir"]))[
        "particles.star"]


def test_atomic_write_reuse_refusal_and_no_temp(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert not write_preset("tiny", out)["reused"]  # an existing empty directory is fine
    before = _digest(out)
    assert write_preset("tiny", out)["reused"] and _digest(out) == before
    with pytest.raises(FileExistsError):
        write_preset("tiny", out, seed=1)
    (out / "truth/info.json").unlink()  # incomplete/unknown content is never reused
    with pytest.raises(FileExistsError):
        write_preset("tiny", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(KeyError):
        write_preset("nope", tmp_path / "x")


def test_states_preset_oracles(tmp_path: Path) -> None:
    """small_states: 3 states with the preset fractions and a finite d^2 to each other state."""
    s = write_preset("small_states", tmp_path / "s")
    info, tr = _truth(Path(s["out_dir"]))
    assert info["state_counts"] == [600, 450, 450]
    good = tr["state"] >= 0
    d2 = tr["d2"][good]
    own = tr["state"][good]
    assert np.allclose(d2[np.arange(len(own)), own], 0.0)
    assert (d2[~np.eye(3, dtype=bool)[own]] > 0).all()
    assert min(info["oracle"]["d2_median"].values()) > 1.0
    assert (tr["t"] == 0).all()


@pytest.mark.relion
def test_relion_reads_particles_star(tiny: Path, tmp_path: Path) -> None:
    exe = shutil.which("relion_star_handler")
    if exe is None:
        pytest.skip("relion_star_handler not on PATH")
    out = tmp_path / "x.star"
    res = subprocess.run([exe, "--i", str(tiny / "particles.star"), "--o", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(starfile.read(out)["particles"]) == json.loads(
        (tiny / "truth/info.json").read_text())["n_rows"]


@pytest.mark.relion
def test_relion_reconstructs_truth(tmp_path: Path) -> None:
    """relion_reconstruct --ctf of a high-SNR set with the written poses, origins and defocus
    gives the truth map (guards Euler, origin sign, CTF sign and box centre together)."""
    exe = shutil.which("relion_reconstruct")
    if exe is None:
        pytest.skip("relion_reconstruct not on PATH")
    p = replace(PRESETS["tiny"], n_particles=1500, snr=20.0, junk_noise_fraction=0.0,
                junk_blob_fraction=0.0, duplicate_fraction=0.0, n_micrographs=5,
                shift_sd_px=2.5)
    root = Path(write_dataset(p, tmp_path / "ds")["out_dir"])
    res = subprocess.run([exe, "--i", "particles.star", "--o", "rec.mrc", "--ctf"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rec, truth = _read(root / "rec.mrc")[0], _read(root / "truth/volumes/state_00.mrc")[0]
    assert np.corrcoef(rec.ravel(), truth.ravel())[0, 1] >= 0.98
