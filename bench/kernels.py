"""Kernel throughput: projection, insertion and GEMM scoring next to the measured GEMM rate.

Usage: python bench/kernels.py [--quick]; the backend follows CRYODAG_BACKEND (numpy|cupy).
Prints a markdown table. Band = Nyquist/2 (r_max = D/4); scoring streams a particle batch
(B particles x T shifts) against R references through ArgMin + LogSumExp reducers
(kernels/scoring.py, algorithms.md §12.2) and, separately, diff2 alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import backend  # noqa: E402
from kernels.fourier import Band  # noqa: E402
from kernels.posterior import ArgMin, LogSumExp  # noqa: E402
from kernels.projection import prepare_volume, project  # noqa: E402
from kernels.reconstruction import Accumulator3D  # noqa: E402
from kernels.rotations import random_rotations  # noqa: E402
from kernels.scoring import (  # noqa: E402
    particle_phases,
    prepare_particles,
    scoring_flops,
    stream,
)


def _sync(xp: Any) -> None:
    if xp is not np:
        xp.cuda.Stream.null.synchronize()


def timed_many(fns: list[Callable[[], Any]], xp: Any, repeat: int) -> list[float]:
    """Best wall time (s) of each function over ``repeat`` interleaved rounds after a warm-up,
    so that all of them see the same machine load."""
    best = [np.inf] * len(fns)
    for rnd in range(repeat + 1):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            _sync(xp)
            if rnd:
                best[i] = min(best[i], time.perf_counter() - t0)
    return best


def timed(fn: Callable[[], Any], xp: Any, repeat: int) -> float:
    """Best wall time of ``repeat`` calls after one warm-up call (seconds)."""
    return timed_many([fn], xp, repeat)[0]


def gemm_rate(xp: Any, n: int, repeat: int) -> float:
    """Measured float32 GEMM rate (FLOP/s) of an n x n x n xp.matmul."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = xp.asarray(rng.standard_normal((n, n), dtype=np.float32))
    return 2.0 * n**3 / timed(lambda: a @ b, xp, repeat)


def bench_box(D: int, n_poses: int, B: int, T: int, repeat: int, xp: Any) -> list:
    rng = np.random.default_rng(D)
    band = Band(D, D // 4)
    nF = band.n
    rot = random_rotations(n_poses, rng)
    vft = prepare_volume(xp.asarray(rng.standard_normal((D, D, D), dtype=np.float32)))
    rows = []

    t = timed(lambda: project(vft, rot, band), xp, repeat)
    rows.append(("projection", D, nF, f"{n_poses} slices", t, n_poses / t, "slices/s", None))

    refs = project(vft, rot, band)
    w8 = xp.ones((n_poses, nF), dtype=xp.float64)
    acc = Accumulator3D(D, xp=xp)
    t = timed(lambda: acc.insert(refs, w8, rot, band), xp, repeat)
    rows.append(("insertion", D, nF, f"{n_poses} slices", t, n_poses / t, "slices/s", None))

    X = xp.asarray(refs[rng.integers(0, n_poses, B)])
    ctf = xp.asarray(rng.uniform(-1.0, 1.0, (B, nF)).astype(np.float32))
    w = xp.asarray(band.weight.astype(np.float32))
    grid = np.array([(x, y) for y in (-1, 0, 1) for x in (-1, 0, 1)], dtype=np.float64)
    shifts = np.resize(grid, (T, 2)) + 0.5 * (np.arange(T)[:, None] // 9)
    particles = prepare_particles(X, ctf, w, particle_phases(band, shifts, xp=xp))
    flops = scoring_flops(B, T, nF, n_poses)
    size = f"{B}x{T} vs {n_poses}"
    neg = xp.asarray(rng.standard_normal((n_poses, 2 * nF), dtype=np.float32))
    gemm_flops = 2.0 * B * T * 2 * nF * n_poses

    class _Drop:
        def update(self, diff2: Any, r0: int) -> None:
            pass

    times = timed_many([lambda: particles.Y @ neg.T,
                        lambda: stream(particles, refs, [_Drop()]),
                        lambda: stream(particles, refs, [ArgMin(), LogSumExp()])], xp, repeat)
    shape = f"({B * T}x{2 * nF})x({2 * nF}x{n_poses})"
    for label, sz, t, fl in (("GEMM alone, scoring shape", shape, times[0], gemm_flops),
                             ("scoring (diff2)", size, times[1], flops),
                             ("scoring + ArgMin + LSE", size, times[2], flops)):
        rows.append((label, D, nF, sz, t, B * n_poses / t, "particle-poses/s", fl / t))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 60 s on 2 cores)")
    args = ap.parse_args()
    xp = backend.get_xp()
    if args.quick:
        boxes, n_poses, B, T, repeat, n_gemm = (64,), 1000, 64, 9, 5, 1024
    else:
        boxes, n_poses, B, T, repeat, n_gemm = (64, 128), 2000, 256, 9, 7, 2048
    first = gemm_rate(xp, n_gemm, repeat)
    rows = [row for D in boxes for row in bench_box(D, n_poses, B, T, repeat, xp)]
    last = gemm_rate(xp, n_gemm, repeat)
    peak = max(first, last)  # best of a measurement before and after the kernels
    print(f"backend: {backend.name()}; float32 GEMM {n_gemm}^3 (xp.matmul, best of {repeat}): "
          f"{first / 1e9:.1f} GFLOP/s before, {last / 1e9:.1f} after; reference = max")
    print()
    print("| kernel | D | nF | size | time (s) | throughput | GFLOP/s | % of GEMM |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d, nF, size, t, thr, unit, fl in rows:
        gf = "" if fl is None else f"{fl / 1e9:.1f}"
        pct = "" if fl is None else f"{100 * fl / peak:.0f}%"
        print(f"| {name} | {d} | {nF} | {size} | {t:.3f} | {thr:,.0f} {unit} | {gf} | {pct} |")


if __name__ == "__main__":
    main()
