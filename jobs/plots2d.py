"""Figures of 2D class averages (class_2d, select_2d, rebalance_2d); matplotlib Agg, no pyplot state.

`class_montage` tiles K averages (largest class first, or grouped by superclass), each labelled
with its class number, particle count and resolution, optionally framed green (selected) / red
(rejected) or in one colour per group. `class_sizes` is the matching bar plot. Both return a
`matplotlib.figure.Figure` for `JobContext.plot`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

SELECTED = "#1a9641"
REJECTED = "#d7191c"
#: Inches per montage tile.
TILE_IN = 1.05


def _order(sizes: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Indices sorted by decreasing size (stable), grouped by ascending group first if given."""
    if groups is None:
        return np.argsort(-sizes, kind="stable")
    return np.lexsort((-sizes, groups))


def _normalise(img: np.ndarray) -> np.ndarray:
    """Image scaled to [0, 1] between its 1st and 99th percentiles."""
    lo, hi = np.percentile(img, [1.0, 99.0])
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(img)


def _frame_colours(
    n: int, selected: Sequence[bool] | None, groups: np.ndarray | None
) -> list[str | tuple] | None:
    if selected is not None and groups is not None:
        raise ValueError("give either selected or groups, not both")
    if selected is not None:
        if len(selected) != n:
            raise ValueError(f"selected has {len(selected)} entries for {n} classes")
        return [SELECTED if s else REJECTED for s in selected]
    if groups is not None:
        cmap = colormaps["tab20"]  # dark shades of its 10 hues first, then the light ones
        return [cmap((2 * (int(g) - 1)) % 20 + ((int(g) - 1) // 10) % 2) for g in groups]
    return None


def class_montage(
    images: np.ndarray,
    class_numbers: Sequence[int],
    sizes: Sequence[float],
    resolutions_A: Sequence[float] | None = None,
    *,
    selected: Sequence[bool] | None = None,
    groups: Sequence[int] | None = None,
    columns: int = 10,
    title: str = "",
) -> Figure:
    """Montage of class averages (K, D, D), largest class first (within each group if `groups`).

    Each tile is labelled "<class>: <count>" and, when `resolutions_A` is given, "<res> Å".
    `selected` (K bools) frames tiles green / red; `groups` (K ints, e.g. superclasses) sorts
    tiles by group, prefixes labels with "S<group>" and frames each group in its own colour.
    """
    images = np.asarray(images, dtype=np.float32)
    K, D = images.shape[0], images.shape[-1]
    numbers = np.asarray(class_numbers)
    size = np.asarray(sizes, dtype=np.float64)
    res = None if resolutions_A is None else np.asarray(resolutions_A, dtype=np.float64)
    grp = None if groups is None else np.asarray(groups)
    colours = _frame_colours(K, selected, grp)
    order = _order(size, grp)

    cols = max(1, min(columns, K))
    rows = max(1, -(-K // cols))
    gap, label_h = max(2, D // 10), max(4, int(0.42 * D))
    cell_w, cell_h = D + gap, D + gap + label_h
    mosaic = np.full((rows * cell_h + gap, cols * cell_w + gap), np.nan, dtype=np.float32)
    fig = Figure(figsize=(cols * TILE_IN * cell_w / D, rows * TILE_IN * cell_h / D + 0.3))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 if not title else 0.97))
    for pos, k in enumerate(order):
        r, c = divmod(pos, cols)
        y0, x0 = r * cell_h + gap + label_h, c * cell_w + gap
        mosaic[y0 : y0 + D, x0 : x0 + D] = _normalise(images[k])
        label = f"{numbers[k]}: {size[k]:.0f}"
        if grp is not None:
            label = f"S{grp[k]} · {label}"
        if res is not None:
            label += f"\n{res[k]:.1f} Å" if np.isfinite(res[k]) else "\n– Å"
        ax.text(x0 + D / 2, y0 - max(2.0, 0.06 * D), label, ha="center", va="bottom", fontsize=6.5, linespacing=1.0)
        if colours is not None:
            ax.add_patch(Rectangle((x0 - 1, y0 - 1), D + 1, D + 1, fill=False,
                                   edgecolor=colours[k], linewidth=2.2))
    ax.imshow(mosaic, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def class_sizes(
    class_numbers: Sequence[int],
    sizes: Sequence[float],
    *,
    selected: Sequence[bool] | None = None,
    title: str = "Particles per class",
) -> Figure:
    """Bar plot of class sizes, largest first; bars green / red when `selected` is given."""
    numbers = np.asarray(class_numbers)
    size = np.asarray(sizes, dtype=np.float64)
    order = _order(size, None)
    colours = _frame_colours(len(size), selected, None)
    fig = Figure(figsize=(min(14.0, 2.0 + 0.18 * len(size)), 3.0))
    ax = fig.add_subplot()
    x = np.arange(len(size))
    ax.bar(x, size[order], color=None if colours is None else [colours[k] for k in order])
    ax.set_xticks(x, [str(n) for n in numbers[order]], fontsize=7, rotation=90 if len(x) > 20 else 0)
    ax.set_xlabel("class")
    ax.set_ylabel("particles")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def group_sizes(
    before: Sequence[int], after: Sequence[int], cap: int | None = None, *, label: str = "superclass"
) -> Figure:
    """Particles per group (groups 1..G) before and after rebalancing, with the cap as a line."""
    x = np.arange(1, len(before) + 1)
    fig = Figure(figsize=(min(12.0, 2.5 + 0.35 * len(x)), 3.0))
    ax = fig.add_subplot()
    ax.bar(x - 0.2, before, width=0.4, label="before", color="#9e9e9e")
    ax.bar(x + 0.2, after, width=0.4, label="after", color="#2b83ba")
    if cap is not None:
        ax.axhline(cap, color=REJECTED, linestyle="--", linewidth=1, label=f"cap {cap}")
    ax.set_xticks(x)
    ax.set_xlabel(label)
    ax.set_ylabel("particles")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
