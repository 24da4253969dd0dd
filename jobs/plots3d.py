"""Figures of 3D maps (ab_initio, hetero_refine, var_3d, ...): central slices and projections of K
maps, montages of map series with their differences from the series' mean, FSC curves, class
fractions over iterations. matplotlib Agg, no pyplot state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def _norm(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1.0, 99.5])
    return np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)


def _signed(img: np.ndarray) -> np.ndarray:
    """img / its 99.5th |value| percentile, clipped to [-1, 1]: 0 stays 0."""
    top = np.percentile(np.abs(img), 99.5)
    return np.clip(img / top, -1, 1) if top > 0 else np.zeros_like(img)


def _show(ax: Any, img: np.ndarray, signed: bool) -> None:
    """Draw an image scaled by ``_signed`` (blue-white-red on [-1, 1]) or ``_norm`` (grey on
    [0, 1]) on a panel without ticks."""
    ax.imshow(img, cmap="RdBu_r" if signed else "gray", vmin=-1 if signed else 0, vmax=1, origin="lower")
    ax.set_xticks([])
    ax.set_yticks([])


def map_views(maps: Sequence[np.ndarray], labels: Sequence[str], signed: Sequence[bool] | None = None) -> Figure:
    """One row per map: projections along z, y, x and the central z, y, x slices. Rows flagged in
    ``signed`` (difference maps, e.g. 3DVA components) are drawn on a scale symmetric about 0
    (blue negative, white 0, red positive), the others in grey from their 1st to 99.5th percentile."""
    n = len(maps)
    signed = [False] * n if signed is None else list(signed)
    fig = Figure(figsize=(7.5, 1.35 * n + 0.4))
    titles = ["proj z", "proj y", "proj x", "slice z", "slice y", "slice x"]
    for i, (v, lab, sign) in enumerate(zip(maps, labels, signed, strict=True)):
        c = v.shape[0] // 2
        panels = [v.sum(0), v.sum(1), v.sum(2), v[c], v[:, c], v[:, :, c]]
        for j, img in enumerate(panels):
            ax = fig.add_subplot(n, 6, 6 * i + j + 1)
            _show(ax, _signed(img) if sign else _norm(img), sign)
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
            if j == 0:
                ax.set_ylabel(lab, fontsize=7)
    fig.tight_layout()
    return fig


def series_montage(maps: Sequence[np.ndarray], rows: int, labels: Sequence[str]) -> Figure:
    """Maps of ``rows`` equal series (3DVA frames along a component, or clusters), one series per
    row pair: projections along z in grey on the series' common scale, and below them each
    projection minus the series' mean projection on a scale symmetric about 0 (blue less, red
    more density), so that what moves along the series is seen."""
    cols = -(-len(maps) // rows)
    fig = Figure(figsize=(min(1.0 * cols, 20.0), 2.05 * rows + 0.3))
    for r in range(rows):
        proj = np.stack([v.sum(axis=0) for v in maps[r * cols:(r + 1) * cols]])
        shown = [(_norm(proj), labels[r]), (_signed(proj - proj.mean(axis=0)), f"{labels[r]} - mean")]
        for half, (imgs, label) in enumerate(shown):
            for c, img in enumerate(imgs):
                ax = fig.add_subplot(2 * rows, cols, (2 * r + half) * cols + c + 1)
                _show(ax, img, signed=half == 1)
                if c == 0:
                    ax.set_ylabel(label, fontsize=7)
                if half == 0:
                    ax.set_title(str(c + 1), fontsize=6)
    fig.tight_layout()
    return fig


def fsc_curves(curves: Sequence[np.ndarray], labels: Sequence[str], box: int, pixel_size: float,
               thresholds: Sequence[float] = (0.143,)) -> Figure:
    """FSC against resolution (1/Å) with the threshold lines."""
    fig = Figure(figsize=(5.0, 3.2))
    ax = fig.add_subplot()
    for c, lab in zip(curves, labels, strict=True):
        r = np.arange(len(c))
        ax.plot(r / (box * pixel_size), c, label=lab)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def class_fractions(history: np.ndarray) -> Figure:
    """Class fractions (iterations, K) as stacked areas."""
    fig = Figure(figsize=(5.0, 3.0))
    ax = fig.add_subplot()
    it = np.arange(history.shape[0])
    ax.stackplot(it, history.T, labels=[f"class {k + 1}" for k in range(history.shape[1])])
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return fig
