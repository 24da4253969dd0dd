"""Slice operator: Fourier-slice accuracy (U1), adjointness (U2), pose conventions, RELION."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from k2_blobs import blob_centres, blob_slice_ft, blob_volume

from kernels.ctf import ctf_2d
from kernels.fourier import Band, irfft2c, shift_phase
from kernels.projection import ImageFT, VolumeFT, prepare_image, prepare_volume, project, rotate_2d
from kernels.reconstruction import Accumulator2D, Accumulator3D
from kernels.rotations import euler_to_matrix, random_rotations


def _rel_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt((np.abs(a - b) ** 2).sum(-1) / (np.abs(b) ** 2).sum(-1))


@pytest.fixture(scope="module")
def u1_phantom():
    rng = np.random.default_rng(0)
    D, sigma = 64, 1.8
    c = blob_centres(60, D / 4, rng)
    amps = rng.uniform(0.5, 1.5, len(c))
    return D, sigma, c, amps, blob_volume(D, c, sigma, amps), random_rotations(10, rng)


@pytest.mark.parametrize(("pad", "limit"), [(2, 0.03), (3, 0.012)])
def test_u1_fourier_slice_vs_analytic(u1_phantom, pad, limit):
    D, sigma, c, amps, vol, R = u1_phantom
    band = Band(D, 0.8 * D / 2)
    truth = blob_slice_ft(D, c, sigma, amps, R, band.kx, band.ky)
    err = _rel_err(project(prepare_volume(vol, pad), R, band), truth)
    print(f"U1 pad={pad}: median {np.median(err):.4f} max {err.max():.4f}")
    assert err.max() < limit


def test_u2_adjoint_3d():
    rng = np.random.default_rng(1)
    D, pad = 16, 2
    n = pad * D
    shape = (n, n, n // 2 + 1)
    v = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    band = Band(D, D // 2 - 1)
    R = random_rotations(7, rng)
    y = rng.standard_normal((7, band.n)) + 1j * rng.standard_normal((7, band.n))
    lhs = np.vdot(y, project(VolumeFT(v, D, pad), R, band)).real
    acc = Accumulator3D(D, pad, np)
    acc.insert(y, np.zeros(y.shape), R, band)
    rhs = np.vdot(acc.data, v).real
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_u2_adjoint_2d_multiclass():
    rng = np.random.default_rng(2)
    D, pad, K = 24, 2, 3
    n = pad * D
    shape = (K, n, n // 2 + 1)
    v = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    band = Band(D, D // 2 - 1)
    psi = rng.uniform(-180, 180, 9)
    cls = rng.integers(0, K, 9)
    P = rotate_2d(ImageFT(v, D, pad), psi, band)  # (K, N, nF)
    y = rng.standard_normal((9, band.n)) + 1j * rng.standard_normal((9, band.n))
    lhs = np.vdot(y, P[cls, np.arange(9)]).real
    acc = Accumulator2D(D, pad, np, n_classes=K)
    acc.insert(y, np.zeros(y.shape), psi, band, classes=cls)
    rhs = np.vdot(acc.data, v).real
    assert abs(lhs - rhs) / abs(lhs) < 1e-10


def test_projection_of_explicitly_rotated_volume():
    """Projection at pose A == z-projection of the map rotated explicitly, v'(x) = v(A^T x)."""
    rng = np.random.default_rng(3)
    D, sigma = 48, 1.8
    c = blob_centres(30, D / 4, rng)
    amps = rng.uniform(0.5, 1.5, len(c))
    vol = blob_volume(D, c, sigma, amps)
    band = Band(D, D // 2 - 1)
    vft = prepare_volume(vol, 2)
    for rot, tilt, psi in [(30.0, 60.0, -45.0), (-120.0, 100.0, 10.0), (0.0, 90.0, 0.0)]:
        A = euler_to_matrix(rot, tilt, psi)
        rotated = blob_volume(D, c @ A[0].T, sigma, amps)
        expected = rotated.sum(axis=0)  # real-space projection along z
        image = irfft2c(band.scatter(project(vft, A, band)), D)
        corr = np.corrcoef(image.ravel(), expected.ravel())[0, 1]
        assert corr > 0.999, (rot, tilt, psi, corr)


def test_rotate_2d_matches_psi_projection():
    """rotate_2d of the projection at (rot, tilt, 0) by psi == projection at (rot, tilt, psi).

    The psi = 0 image is the exact (analytic) projection, so only rotate_2d is tested.
    """
    rng = np.random.default_rng(4)
    D, sigma = 48, 1.8
    c = blob_centres(40, D / 4, rng)
    amps = rng.uniform(0.5, 1.5, len(c))
    band = Band(D, 0.8 * D / 2)
    rot, tilt = 40.0, 70.0
    xy = (c @ euler_to_matrix(rot, tilt, 0.0)[0].T)[:, :2]
    g = np.arange(D) - D // 2
    img0 = sum(
        a * np.sqrt(2 * np.pi) * sigma * np.exp(-((g[None, :] - x) ** 2 + (g[:, None] - y) ** 2) / (2 * sigma**2))
        for a, (x, y) in zip(amps, xy, strict=True)
    )
    psi = np.concatenate([[0.0, 90.0], rng.uniform(-180, 180, 6)])
    rotated = rotate_2d(prepare_image(img0.astype(np.float32), 2), psi, band)
    R = euler_to_matrix(np.full(psi.size, rot), np.full(psi.size, tilt), psi)
    truth = blob_slice_ft(D, c, sigma, amps, R, band.kx, band.ky)
    err = _rel_err(rotated, truth)
    print(f"rotate_2d: median {np.median(err):.4f} max {err.max():.4f}")
    assert err.max() < 0.03


# ---------------------------------------------------------------- RELION cross-checks


def _write_relion_inputs(tmp_path, vol, apix, rot, tilt, psi, shifts, ctf):
    import mrcfile
    import pandas as pd
    import starfile

    D = vol.shape[-1]
    with mrcfile.new(tmp_path / "vol.mrc", overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = apix
    n = len(rot)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnImagePixelSize": [apix],
            "rlnImageSize": [D],
            "rlnImageDimensionality": [2],
            "rlnVoltage": [ctf["voltage_kv"]],
            "rlnSphericalAberration": [ctf["cs_mm"]],
            "rlnAmplitudeContrast": [ctf["amplitude_contrast"]],
        }
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            # cryodag content shift +t  <->  RELION origin -t (measured, see test below)
            "rlnOriginXAngst": -shifts[:, 0] * apix,
            "rlnOriginYAngst": -shifts[:, 1] * apix,
            "rlnDefocusU": ctf["defocus_u"],
            "rlnDefocusV": ctf["defocus_v"],
            "rlnDefocusAngle": ctf["defocus_angle"],
            "rlnOpticsGroup": 1,
        }
    )
    starfile.write({"optics": optics, "particles": parts}, tmp_path / "particles.star")


def relion_case(n: int, D: int, seed: int):
    """Blob volume, random poses/shifts/CTFs for RELION comparisons."""
    rng = np.random.default_rng(seed)
    c = blob_centres(25, D / 4, rng)
    vol = blob_volume(D, c, 1.5, rng.uniform(0.5, 1.5, len(c)))
    rot = rng.uniform(-180, 180, n)
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    psi = rng.uniform(-180, 180, n)
    shifts = rng.uniform(-3, 3, (n, 2))
    du = rng.uniform(5000, 20000, n)
    ctf = {
        "defocus_u": du,
        "defocus_v": du - rng.uniform(0, 500, n),
        "defocus_angle": rng.uniform(0, 180, n),
        "voltage_kv": 300.0,
        "cs_mm": 2.7,
        "amplitude_contrast": 0.1,
    }
    return vol, rot, tilt, psi, shifts, ctf


def cryodag_particles(vol, apix, rot, tilt, psi, shifts, ctf, band, with_ctf):
    """Band-limited particle FTs (N, nF): projection * shift ramp (+t) [* CTF]."""
    D = vol.shape[-1]
    P = project(prepare_volume(vol, 2), euler_to_matrix(rot, tilt, psi), band)
    P = P * shift_phase(D, shifts, band)
    if with_ctf:
        C = ctf_2d(
            D,
            apix,
            ctf["defocus_u"],
            ctf["defocus_v"],
            ctf["defocus_angle"],
            voltage_kv=ctf["voltage_kv"],
            cs_mm=ctf["cs_mm"],
            amplitude_contrast=ctf["amplitude_contrast"],
            band=band,
        )
        P = P * C
    return P


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project not on PATH")
@pytest.mark.parametrize("with_ctf", [False, True])
def test_relion_project_matches(tmp_path, with_ctf):
    import mrcfile

    D, apix, n = 32, 2.0, 40
    vol, rot, tilt, psi, shifts, ctf = relion_case(n, D, seed=5)
    _write_relion_inputs(tmp_path, vol, apix, rot, tilt, psi, shifts, ctf)
    cmd = ["relion_project", "--i", "vol.mrc", "--o", "proj", "--ang", "particles.star"]
    subprocess.run(cmd + (["--ctf"] if with_ctf else []), cwd=tmp_path, check=True, capture_output=True)
    relion = mrcfile.read(tmp_path / "proj.mrcs")
    band = Band(D, D // 2 - 1)
    ours = irfft2c(band.scatter(cryodag_particles(vol, apix, rot, tilt, psi, shifts, ctf, band, with_ctf)), D)
    corr = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, relion, strict=True)])
    print(f"relion_project ctf={with_ctf}: min corr {corr.min():.8f}")
    assert corr.min() >= 0.99
