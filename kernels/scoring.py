"""Scoring particles x shifts against references as real GEMMs (algorithms.md §0, §1.8, §12.2).

For a particle batch X (B, nF) complex band coefficients, CTF C (B, nF) real (multiply by the
per-particle scale alpha beforehand if used), w = inv_sigma2 (nF,) (including the band's 0.5
weight on the kx == 0 column), shift hypotheses t (T, 2) px and references P (R, nF):

    diff2[b, t, r] = 0.5 sum_f w |X_b e^{+2 pi i k.t/D} - C_b P_r|^2
                   = 0.5 sum w |X_b|^2 + 0.5 sum w C_b^2 |P_r|^2 - Re sum X_b e^{..} C_b w conj(P_r)

The cross term is one float32 GEMM (B*T, 2nF) x (2nF, Rc) on [Re|Im] concatenations; the two
norms are float64 (the second a float64 GEMM (B, nF) x (nF, Rc)), per §10.7. References are
streamed in chunks and each chunk of diff2 (B, T, Rc) float32 goes to reducers
(``kernels.posterior``) and is then dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from kernels.backend import memory_budget_bytes, to_host, xp_of
from kernels.fourier import Band, shift_phase


class Reducer(Protocol):
    """Consumer of diff2 chunks (B, T, Rc) for references r0 .. r0+Rc-1."""

    def update(self, diff2: Any, r0: int) -> None: ...


@dataclass(frozen=True)
class Particles:
    """Particle-side operands of one batch.

    Y: (B*T, 2nF) float32 [Re|Im] of X e^{+2 pi i k.t/D} C w, rows ordered (b, t);
    ctf2w: (B, nF) float64 C^2 w; half_norm: (B,) float64 0.5 sum w |X|^2.
    """

    Y: Any
    ctf2w: Any
    half_norm: Any
    n_shifts: int

    @property
    def n_particles(self) -> int:
        return int(self.half_norm.shape[0])

    @property
    def n_freq(self) -> int:
        return int(self.ctf2w.shape[1])


def particle_phases(band: Band, shifts: Any, xp: Any = None) -> Any:
    """(T, nF) complex64 factors e^{+2 pi i k.t/D} that undo a shift t of the particle (the
    conjugate of ``kernels.fourier.shift_phase``); shifts (T, 2) px as (tx, ty)."""
    return shift_phase(band.D, shifts, band, xp=xp).conj()


def prepare_particles(X: Any, ctf: Any, inv_sigma2: Any, phases: Any) -> Particles:
    """Particle operands from X (B, nF) complex, ctf (B, nF), inv_sigma2 (nF,), phases (T, nF)
    (from ``particle_phases``)."""
    xp = xp_of(X, ctf, inv_sigma2, phases)
    X = xp.asarray(X)
    B, nF = X.shape
    w = xp.asarray(inv_sigma2, dtype=xp.float64)
    C = xp.asarray(ctf, dtype=xp.float64)
    phases = xp.asarray(phases).reshape(-1, nF)
    T = phases.shape[0]
    Xw = (X * (C * w).astype(xp.float32)).astype(xp.complex64)
    Z = Xw[:, None, :] * phases.astype(xp.complex64)[None, :, :]
    Y = xp.empty((B * T, 2 * nF), dtype=xp.float32)
    Y[:, :nF] = Z.real.reshape(B * T, nF)
    Y[:, nF:] = Z.imag.reshape(B * T, nF)
    X64 = X.astype(xp.complex128)
    half_norm = 0.5 * ((X64.real**2 + X64.imag**2) @ w)
    return Particles(Y=Y, ctf2w=C * C * w[None, :], half_norm=half_norm, n_shifts=T)


def diff2_chunk(particles: Particles, P: Any) -> Any:
    """diff2 (B, T, Rc) float32 of the batch against references P (Rc, nF) complex."""
    xp = xp_of(particles.Y, P)
    B, T, nF = particles.n_particles, particles.n_shifts, particles.n_freq
    P = xp.asarray(P)
    rc = P.shape[0]
    neg = xp.empty((rc, 2 * nF), dtype=xp.float32)  # -[Re|Im]: the GEMM yields -cross
    xp.negative(P.real, out=neg[:, :nF])
    xp.negative(P.imag, out=neg[:, nF:])
    d = (particles.Y @ neg.T).reshape(B, T, rc)
    sq = xp.square(neg, dtype=xp.float64)  # exact squares; |P|^2 = Re^2 + Im^2 in float64
    sq[:, :nF] += sq[:, nF:]
    norm = particles.ctf2w @ sq[:, :nF].T
    d += (particles.half_norm[:, None] + 0.5 * norm).astype(xp.float32)[:, None, :]
    return d


def ref_chunk_size(
    n_particles: int, n_shifts: int, n_freq: int, n_refs: int, budget: int | None = None
) -> int:
    """References per chunk R_c with B*T*nF*8 + R_c*nF*8 + B*T*R_c*4 <= budget
    (default ``memory_budget_bytes()``), clipped to [1, n_refs]."""
    budget = memory_budget_bytes() if budget is None else int(budget)
    bt = n_particles * n_shifts
    free = budget - bt * n_freq * 8
    rc = free // (n_freq * 8 + bt * 4)
    return int(min(max(rc, 1), n_refs))


def stream(
    particles: Particles,
    refs: Any | Callable[[int, int], Any],
    reducers: Sequence[Reducer],
    *,
    n_refs: int | None = None,
    chunk: int | None = None,
) -> None:
    """Score the batch against all references chunk by chunk, feeding every reducer.

    refs: (R, nF) complex array, or a callable (r0, r1) -> (r1 - r0, nF) that makes the
    references on the fly (e.g. ``project(vft, rotations[r0:r1], band)``; then give n_refs).
    chunk: references per chunk (default ``ref_chunk_size``).
    """
    if callable(refs):
        if n_refs is None:
            raise ValueError("n_refs is required when refs is a callable")
        get = refs
    else:
        n_refs = refs.shape[0] if n_refs is None else n_refs

        def get(r0: int, r1: int) -> Any:
            return refs[r0:r1]

    if chunk is None:
        chunk = ref_chunk_size(
            particles.n_particles, particles.n_shifts, particles.n_freq, n_refs
        )
    for r0 in range(0, n_refs, chunk):
        d = diff2_chunk(particles, get(r0, min(r0 + chunk, n_refs)))
        for red in reducers:
            red.update(d, r0)


def score_direct(X: Any, ctf: Any, inv_sigma2: Any, phases: Any, P: Any) -> np.ndarray:
    """Reference loop: diff2 (B, T, R) float64 = 0.5 sum w |X e^{..} - C P|^2 (on the host)."""
    X, C, w, ph, P = (to_host(a).astype(np.complex128) for a in (X, ctf, inv_sigma2, phases, P))
    B, T, R = X.shape[0], ph.shape[0], P.shape[0]
    out = np.empty((B, T, R))
    for b in range(B):
        for t in range(T):
            for r in range(R):
                resid = X[b] * ph[t] - C[b] * P[r]
                out[b, t, r] = 0.5 * np.sum(w.real * (resid.real**2 + resid.imag**2))
    return out


def scoring_flops(n_particles: int, n_shifts: int, n_freq: int, n_refs: int) -> float:
    """Floating-point operations of scoring: cross GEMM 2*(B*T)*(2nF)*R + norm GEMM 2*B*nF*R."""
    return 2.0 * n_refs * n_freq * (2.0 * n_particles * n_shifts + n_particles)
