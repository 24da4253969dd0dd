"""Back-projection accumulators and Wiener/MAP reconstruction (algorithms.md §1.5, §12.4).

Accumulators live on the padded half grid (pD, [pD,] pD//2+1): ``data`` (complex128) sums
value * w and ``weight`` (float64) sums weight * w, where w are the linear-interpolation
weights of ``kernels.projection.interp_stencil`` (the exact adjoint of ``project`` /
``rotate_2d``). NumPy inserts with ``np.bincount`` over the raveled grid, CuPy with
``cupyx.scatter_add`` (float64 atomics).

The kx = 0 plane holds both a point and its Friedel mate; ``hermitian()`` returns copies in
which each pair carries the sum of both (done once, before symmetrisation and division).
Per-shell quantities use the shell index of the unpadded box, round(|kappa| / pad).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from kernels.backend import InOrder, batch_slices, get_xp, map_batches, xp_of
from kernels.fourier import Band, freqs_2d, freqs_3d, irfft2c, irfft3c, radial_average, shift_phase
from kernels.fsc import fsc as fsc_curve
from kernels.projection import (
    crop_centred,
    gridding_kernel,
    inplane_coords,
    interp_stencil,
    slice_coords,
    stencil_chunk,
)


def scatter_add(target: Any, idx: Any, values: Any) -> None:
    """target.ravel()[idx] += values (duplicates summed); float64 target, in place."""
    xp = xp_of(target)
    flat = target.reshape(-1)
    if xp is np:
        flat += np.bincount(idx.ravel(), weights=values.ravel(), minlength=flat.size)
    else:
        import cupyx

        cupyx.scatter_add(flat, idx.ravel(), values.ravel())


def _insert(data: Any, weight: Any, q: Any, values: Any, weights: Any, n: int, offset: Any,
            turn: AbstractContextManager[None]) -> None:
    """Trilinear/bilinear insertion of values (N, nF) and weights (N, nF) at coordinates q; the
    stencils are computed first, the scatter into data/weight inside ``turn``."""
    xp = xp_of(data)
    idx, w, neg = interp_stencil(q.astype(xp.float64), n)
    if offset is not None:
        idx = idx + offset
    v = xp.asarray(values).astype(xp.complex128)
    v = xp.where(neg, xp.conj(v), v)[..., None] * w
    wt = xp.asarray(weights).astype(xp.float64)[..., None] * w
    dview = data.reshape(-1).view(xp.float64)
    with turn:
        scatter_add(dview, 2 * idx, v.real)
        scatter_add(dview, 2 * idx + 1, v.imag)
        scatter_add(weight, idx, wt)


def _friedel_index(n: int, ndim: int, xp: ModuleType) -> Any:
    """For the kx = 0 plane (n,)*(ndim-1) raveled: index of -k for each k (mod n)."""
    neg = (-xp.arange(n)) % n
    if ndim == 2:
        return neg
    return (neg[:, None] * n + neg[None, :]).ravel()


class _Accumulator:
    """Shared machinery of the 2D and 3D accumulators; ``ndim`` is the Fourier dimension."""

    ndim: int
    data: Any
    weight: Any

    def __init__(self, D: int, pad: int, xp: ModuleType | None, lead: tuple[int, ...]) -> None:
        if D % 2:
            raise ValueError(f"box size must be even, got {D}")
        self.D, self.pad = D, pad
        self.xp = get_xp() if xp is None else xp
        n = pad * D
        shape = (*lead, *([n] * (self.ndim - 1)), n // 2 + 1)
        self.data = self.xp.zeros(shape, dtype=self.xp.complex128)
        self.weight = self.xp.zeros(shape, dtype=self.xp.float64)

    @property
    def n(self) -> int:
        """Padded box size pD."""
        return self.pad * self.D

    def chunks(self, n_items: int, nF: int) -> InOrder:
        """Insertion chunks of n_items slices of nF pixels, in scatter order: ``stencil_chunk``
        with >= 2 x grid-size stencil entries each (a chunk's scatter costs O(grid)). Measured
        (20,000 slices, D = 24, one thread): 2.8 s in one chunk, 1.2-1.5 s in these."""
        step = stencil_chunk(n_items, nF, self.ndim, self.xp, max(1 << 18, 2 * self.weight.size))
        return InOrder(batch_slices(n_items, step, self.xp))

    def shells(self) -> Any:
        """Unpadded shell index round(|kappa| / pad) on the padded half grid (int64)."""
        ks = freqs_2d(self.n, self.xp) if self.ndim == 2 else freqs_3d(self.n, self.xp)
        r = self.xp.sqrt(sum(k.astype(self.xp.float64) ** 2 for k in ks)) / self.pad
        return self.xp.rint(r).astype(self.xp.int64)

    def add(self, other: _Accumulator) -> None:
        """Add another accumulator of the same geometry (e.g. combine half sets)."""
        if other.data.shape != self.data.shape or other.pad != self.pad:
            raise ValueError("accumulators differ in shape or padding")
        self.data += other.data
        self.weight += other.weight

    def hermitian(self) -> tuple[Any, Any]:
        """Copies of (data, weight) with each kx = 0 Friedel pair holding the sum of both."""
        data, weight = self.data.copy(), self.weight.copy()
        lead = data.shape[: data.ndim - self.ndim]
        plane = (*lead, -1)
        fi = _friedel_index(self.n, self.ndim, self.xp)
        d0 = data[..., 0].reshape(plane)
        w0 = weight[..., 0].reshape(plane)
        data[..., 0] = (d0 + self.xp.conj(d0[..., fi])).reshape(data[..., 0].shape)
        weight[..., 0] = (w0 + w0[..., fi]).reshape(weight[..., 0].shape)
        return data, weight


class Accumulator3D(_Accumulator):
    """3D back-projection accumulator on the padded half volume (pD, pD, pD//2+1)."""

    ndim = 3

    def __init__(self, D: int, pad: int = 2, xp: ModuleType | None = None) -> None:
        super().__init__(D, pad, xp, ())

    def insert(self, values: Any, weights: Any, R: Any, band: Band) -> None:
        """Insert slices: values (N, nF) complex and weights (N, nF) real at pad * A^T k.

        Exact adjoint of ``kernels.projection.project`` for the same R and band.
        """
        xp = self.xp
        R = xp.asarray(R, dtype=xp.float64).reshape(-1, 3, 3)
        values, weights = xp.asarray(values), xp.asarray(weights)
        order = self.chunks(R.shape[0], band.n)

        def one(sl: slice) -> None:
            q = slice_coords(R[sl], band, self.pad)
            _insert(self.data, self.weight, q, values[sl], weights[sl], self.n, None, order.turn(sl))

        map_batches(one, order.slices, xp, order)

    def symmetrize(self, ops: Any) -> None:
        """Average over a point group in Fourier space: sum_g of the grids sampled at R_g kappa.

        ops: (G, 3, 3) all group operators (identity included). Hermitian pairs on the kx = 0
        plane are combined first; the result is stored so that ``hermitian()`` reproduces it.
        Voxels with shell >= D/2 (never used by ``wiener``) are zeroed.
        """
        xp = self.xp
        ops = xp.asarray(ops, dtype=xp.float64).reshape(-1, 3, 3)
        data, weight = self.hermitian()
        kz, ky, kx = freqs_3d(self.n, xp)
        kappa = xp.stack([kx, ky, kz], axis=-1).reshape(-1, 3).astype(xp.float64)
        inside = self.shells().reshape(-1) < self.D // 2
        k_in = kappa[inside]
        new_d = xp.zeros(data.size, dtype=data.dtype)
        new_w = xp.zeros(weight.size, dtype=weight.dtype)
        flat_d, flat_w = data.reshape(-1), weight.reshape(-1)
        for g in ops:
            idx, w, neg = interp_stencil(k_in @ g.T, self.n)
            vals = (flat_d[idx] * w).sum(-1)
            new_d[inside] += xp.where(neg, xp.conj(vals), vals)
            new_w[inside] += (flat_w[idx] * w).sum(-1)
        self.data = new_d.reshape(data.shape)
        self.weight = new_w.reshape(weight.shape)
        self.data[..., 0] *= 0.5
        self.weight[..., 0] *= 0.5


class Accumulator2D(_Accumulator):
    """2D back-rotation accumulators for ``n_classes`` references: (K, pD, pD//2+1)."""

    ndim = 2

    def __init__(self, D: int, pad: int = 2, xp: ModuleType | None = None, n_classes: int = 1) -> None:
        super().__init__(D, pad, xp, (n_classes,))
        self.n_classes = n_classes

    def insert(self, values: Any, weights: Any, psi_deg: Any, band: Band, classes: Any = None) -> None:
        """Back-rotate values (N, nF) and weights (N, nF) with in-plane angles psi (N,) degrees
        into class ``classes`` (N,) ints (default all class 0). Adjoint of ``rotate_2d``."""
        xp = self.xp
        psi = np.atleast_1d(np.asarray(psi_deg, dtype=np.float64))
        cls = np.zeros(psi.size, np.int64) if classes is None else np.asarray(classes, np.int64)
        plane = self.n * (self.n // 2 + 1)
        values, weights = xp.asarray(values), xp.asarray(weights)
        order = self.chunks(psi.size, band.n)

        def one(sl: slice) -> None:
            q = inplane_coords(psi[sl], band, self.pad, xp, xp.float64)
            offset = xp.asarray(cls[sl] * plane)[:, None, None]
            _insert(self.data, self.weight, q, values[sl], weights[sl], self.n, offset, order.turn(sl))

        map_batches(one, order.slices, xp, order)


def backproject(
    acc: Accumulator3D | Accumulator2D,
    X: Any,
    poses: Any,
    band: Band,
    *,
    ctf: Any = None,
    shifts: Any = None,
    weights: Any = None,
    classes: Any = None,
) -> None:
    """Insert particle FTs X (N, nF) (band pixels) into ``acc``:
    values C * X * exp(+2 pi i k.t / D) * w, weights C^2 * w (algorithms.md §1.5).

    poses: R (N, 3, 3) for 3D or psi (N,) degrees for 2D; ctf (N, nF) or None; shifts (N, 2)
    px (content of X moved by +t) or None; weights (N,) or (N, nF) (posterior / 1/sigma2) or
    None. The kx = 0 column is weighted 0.5 (it holds each pixel twice).
    """
    xp = acc.xp
    X = xp.asarray(X)
    w = xp.asarray(band.on(xp, "weight"), dtype=xp.float64)[None, :]
    if weights is not None:
        wt = xp.asarray(weights, dtype=xp.float64)
        w = w * (wt[:, None] if wt.ndim == 1 else wt)
    w = xp.broadcast_to(w, X.shape)
    vals = X.astype(xp.complex128)
    if shifts is not None:
        vals = vals * xp.conj(shift_phase(acc.D, xp.asarray(shifts), band, dtype=xp.complex128))
    if ctf is not None:
        c = xp.asarray(ctf, dtype=xp.float64)
        vals, w2 = vals * c * w, c * c * w
    else:
        vals, w2 = vals * w, w
    if isinstance(acc, Accumulator2D):
        acc.insert(vals, w2, poses, band, classes=classes)
    else:
        acc.insert(vals, w2, poses, band)


def _per_shell(values: Any, shells: Any, n_shells: int, inside: Any) -> Any:
    """Per-shell mean of values (..., *grid) over voxels ``inside`` -> (..., n_shells)."""
    sh = shells.copy()
    sh[~inside] = n_shells
    return radial_average(values, sh, n_shells)


def wiener(
    acc: Accumulator3D | Accumulator2D,
    tau2: Any = None,
    T: float = 1.0,
    floor: float = 1e-3,
    mask: Any = None,
) -> Any:
    """MAP/Wiener reconstruction V = B / max(W + 1/(p^d T tau2(r)), floor * shellmean(W')).

    tau2: per-shell signal variance per real component, (n_shells,) (or (K, n_shells) for a
    2D accumulator), None for no prior. Shells with tau2 <= 0 or beyond len(tau2) are set
    to zero (no signal); everything with r >= D/2 is zero. Then inverse FFT at pD, crop to
    D, divide by sinc^2(r/(pD)) and multiply by ``mask`` if given.
    Returns float32 (D, D, D) for 3D, (K, D, D) for 2D.
    """
    xp = acc.xp
    d = acc.ndim
    p = acc.pad
    data, W = acc.hermitian()
    shells = acc.shells()
    n_sh = acc.D // 2
    inside = shells < n_sh
    keep = xp.broadcast_to(inside, W.shape)
    if tau2 is not None:
        t = xp.asarray(tau2, dtype=xp.float64)
        n_t = t.shape[-1]
        t_vox = t[..., xp.minimum(shells, n_t - 1)]
        has_signal = (shells < n_t) & (t_vox > 0)
        W = W + xp.where(has_signal, 1.0 / (p**d * T * xp.where(has_signal, t_vox, 1.0)), 0.0)
        keep = keep & has_signal
    avg = _per_shell(W, shells, n_sh, inside)
    floor_vox = floor * avg[..., xp.minimum(shells, n_sh - 1)]
    denom = xp.maximum(W, floor_vox)
    keep = keep & (denom > 0)
    V = xp.where(keep, data / xp.where(keep, denom, 1.0), 0.0)
    real = irfft3c(V, acc.n) if d == 3 else irfft2c(V, acc.n)
    vol = crop_centred(real, acc.D, d) / gridding_kernel(acc.D, p, d, xp)
    if mask is not None:
        vol = vol * xp.asarray(mask)
    return vol.astype(xp.float32)


def tau2_from_fsc(fsc: Any, acc: Accumulator3D | Accumulator2D, full: bool = False) -> Any:
    """Signal variance per real component from an FSC between half maps (algorithms.md §1.5).

    FSC clamped to [0.001, 0.999]; SSNR = F/(1-F); tau2(r) = SSNR(r) / mean_shell(p^d W).
    ``acc`` is the accumulator the prior will be used with. ``full=True`` converts a
    half-map FSC for a map from both halves with the SSNR-exact rule F_full = 2F/(1+F)
    (pass the combined accumulator). Shells without weight get tau2 = 0.
    """
    xp = acc.xp
    F = xp.clip(xp.asarray(fsc, dtype=xp.float64), 0.001, 0.999)
    if full:
        F = xp.clip(2 * F / (1 + F), 0.001, 0.999)
    ssnr = F / (1 - F)
    n = F.shape[-1]
    _, W = acc.hermitian()
    shells = acc.shells()
    mean_w = _per_shell(acc.pad**acc.ndim * W, shells, n, shells < n)
    return xp.where(mean_w > 0, ssnr / xp.where(mean_w > 0, mean_w, 1.0), 0.0)


@dataclass
class HalfMaps:
    """Gold-standard result: regularised half maps, the half-map FSC, tau2 (2, n_shells) used
    for each half, and the two accumulators."""

    half1: Any
    half2: Any
    fsc: Any
    tau2: Any
    acc1: Accumulator3D
    acc2: Accumulator3D


def reconstruct_halves(
    X: Any,
    R: Any,
    band: Band,
    halves: Any,
    *,
    ctf: Any = None,
    shifts: Any = None,
    weights: Any = None,
    pad: int = 2,
    T: float = 1.0,
    mask: Any = None,
) -> HalfMaps:
    """Two independent reconstructions of particles split by ``halves`` (N,) in {0, 1}.

    Unregularised half maps give the FSC (masked by ``mask`` if given); the tau2 it implies
    (per half accumulator) regularises the returned half maps. X (N, nF) band pixels.
    """
    xp = xp_of(X)
    halves = np.asarray(halves)
    accs = []
    for h in (0, 1):
        sel = np.flatnonzero(halves == h)
        acc = Accumulator3D(band.D, pad, xp)
        backproject(
            acc,
            X[sel],
            xp.asarray(R)[sel],
            band,
            ctf=None if ctf is None else xp.asarray(ctf)[sel],
            shifts=None if shifts is None else xp.asarray(shifts)[sel],
            weights=None if weights is None else xp.asarray(weights)[sel],
        )
        accs.append(acc)
    raw = [wiener(a) for a in accs]
    curve = fsc_curve(raw[0], raw[1], mask)
    tau2 = xp.stack([tau2_from_fsc(curve, a) for a in accs])
    maps = [wiener(a, t, T=T, mask=mask) for a, t in zip(accs, tau2, strict=True)]
    return HalfMaps(maps[0], maps[1], curve, tau2, accs[0], accs[1])
