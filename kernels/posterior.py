"""Streaming reducers over chunks of scores (algorithms.md §1.7, §10.7, §10.20, §12.2).

A scorer hands every reducer the chunks ``diff2`` (B, T, Rc) float32 of one particle batch
(B particles x T shifts) against references r0 .. r0+Rc-1, via ``update(diff2, r0)``; the full
(B, T, R) tensor is never stored. Reducers that need posteriors turn diff2 into logits

    l[b, t, r] = -diff2[b, t, r] / temperature + log_prior_t[(b,) t] + log_prior_r[(b,) r]

(temperature = c_t^2 of noise annealing; log priors optional). Results are per particle,
optionally per group of references (``groups`` (R,) ints, e.g. the class of each reference)
with shape (B, G).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels.backend import to_host, xp_of


@dataclass(frozen=True)
class Logits:
    """diff2 -> logits: -diff2 / temperature + log_prior_t + log_prior_r (float32).

    log_prior_t: (T,) or (B, T); log_prior_r: (R,) or (B, R) over all R references.
    """

    temperature: float = 1.0
    log_prior_t: Any = None
    log_prior_r: Any = None

    def __call__(self, diff2: Any, r0: int) -> Any:
        xp = xp_of(diff2)
        l = -diff2 if self.temperature == 1.0 else diff2 * np.float32(-1.0 / self.temperature)
        if self.log_prior_t is not None:  # l is a new array: the priors are added in place
            lt = xp.asarray(self.log_prior_t, dtype=xp.float32)
            l += lt[None, :, None] if lt.ndim == 1 else lt[:, :, None]
        if self.log_prior_r is not None:
            lr = xp.asarray(self.log_prior_r, dtype=xp.float32)[..., r0 : r0 + diff2.shape[2]]
            l += lr[None, None, :] if lr.ndim == 1 else lr[:, None, :]
        return l


def _group_columns(groups: np.ndarray | None, r0: int, rc: int) -> list[tuple[int, Any]]:
    """[(group, columns)] of a chunk r0 .. r0+rc-1; columns a slice when contiguous."""
    if groups is None:
        return [(0, slice(None))]
    g = groups[r0 : r0 + rc]
    out: list[tuple[int, Any]] = []
    for k in np.unique(g):
        cols = np.flatnonzero(g == k)
        contiguous = cols[-1] - cols[0] + 1 == cols.size
        out.append((int(k), slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols))
    return out


def _n_groups(groups: np.ndarray | None) -> int:
    return 1 if groups is None else int(groups.max()) + 1


def _squeeze(a: Any, groups: np.ndarray | None) -> Any:
    return a[:, 0] if groups is None else a


class ArgMax:
    """Best hypothesis per particle (and group) by logit: ``score`` (B[, G]) float32 logits,
    ``ref`` and ``shift`` (B[, G]) int64 indices of reference r and shift t."""

    _minimize = False

    def __init__(self, logits: Logits | None = None, groups: Any = None) -> None:
        self.logits = Logits() if logits is None else logits
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self._best: Any = None

    def _values(self, diff2: Any, r0: int) -> Any:
        return self.logits(diff2, r0)

    def update(self, diff2: Any, r0: int) -> None:
        xp = xp_of(diff2)
        B, T, rc = diff2.shape
        if self._best is None:
            shape = (B, _n_groups(self.groups))
            start = np.inf if self._minimize else -np.inf
            self._best = xp.full(shape, start, dtype=xp.float32)
            self._ref = xp.full(shape, -1, dtype=xp.int64)
            self._shift = xp.full(shape, -1, dtype=xp.int64)
        v = self._values(diff2, r0)
        for g, cols in _group_columns(self.groups, r0, rc):
            vg = v[:, :, cols].reshape(B, -1)
            i = xp.argmin(vg, axis=1) if self._minimize else xp.argmax(vg, axis=1)
            best = xp.take_along_axis(vg, i[:, None], axis=1)[:, 0]
            nc = vg.shape[1] // T
            ref = r0 + xp.asarray(np.arange(rc)[cols])[i % nc]
            better = best < self._best[:, g] if self._minimize else best > self._best[:, g]
            self._best[:, g] = xp.where(better, best, self._best[:, g])
            self._ref[:, g] = xp.where(better, ref, self._ref[:, g])
            self._shift[:, g] = xp.where(better, i // nc, self._shift[:, g])

    @property
    def score(self) -> Any:
        return _squeeze(self._best, self.groups)

    @property
    def ref(self) -> Any:
        return _squeeze(self._ref, self.groups)

    @property
    def shift(self) -> Any:
        return _squeeze(self._shift, self.groups)


class ArgMin(ArgMax):
    """Smallest diff2 per particle (and group), no priors: ``score`` is that diff2."""

    _minimize = True

    def __init__(self, groups: Any = None) -> None:
        super().__init__(None, groups)

    def _values(self, diff2: Any, r0: int) -> Any:
        return diff2


class LogSumExp:
    """Streaming log-sum-exp of the logits per particle (and group), with pose ESS.

    Per chunk: float32 max, exp and sums (U10); across chunks: running max and rescaled sums
    in float64. ``lse`` (B[, G]) float64 = log sum_h exp(l_h); ``ess`` = 1 / sum_h gamma_h^2
    of the posterior within the group; ``total`` (B,) = log-sum-exp over all groups.
    """

    def __init__(self, logits: Logits | None = None, groups: Any = None) -> None:
        self.logits = Logits() if logits is None else logits
        self.groups = None if groups is None else np.asarray(groups, dtype=np.int64)
        self._m: Any = None

    def update(self, diff2: Any, r0: int) -> None:
        xp = xp_of(diff2)
        B, _, rc = diff2.shape
        if self._m is None:
            shape = (B, _n_groups(self.groups))
            self._m = xp.full(shape, -np.inf, dtype=xp.float64)
            self._s1 = xp.zeros(shape, dtype=xp.float64)
            self._s2 = xp.zeros(shape, dtype=xp.float64)
        l = self.logits(diff2, r0)
        for g, cols in _group_columns(self.groups, r0, rc):
            lg = l[:, :, cols].reshape(B, -1)
            cm = lg.max(axis=1)
            cm = xp.where(xp.isfinite(cm), cm, np.float32(0.0))
            e = lg - cm[:, None]
            xp.exp(e, out=e)
            cs1 = e.sum(axis=1, dtype=xp.float32).astype(xp.float64)
            cs2 = xp.einsum("ij,ij->i", e, e).astype(xp.float64)
            cm = xp.where(cs1 > 0, cm.astype(xp.float64), -np.inf)
            m_old = self._m[:, g]
            m_new = xp.maximum(m_old, cm)
            finite = xp.isfinite(m_new)
            base = xp.where(finite, m_new, 0.0)
            a_old = xp.where(xp.isfinite(m_old), xp.exp(m_old - base), 0.0)
            a_new = xp.where(xp.isfinite(cm), xp.exp(cm - base), 0.0)
            self._s1[:, g] = self._s1[:, g] * a_old + cs1 * a_new
            self._s2[:, g] = self._s2[:, g] * a_old**2 + cs2 * a_new**2
            self._m[:, g] = m_new

    @property
    def lse(self) -> Any:
        xp = xp_of(self._m)
        with np.errstate(divide="ignore"):
            return _squeeze(self._m + xp.log(self._s1), self.groups)

    @property
    def total(self) -> Any:
        xp = xp_of(self._m)
        m = self._m.max(axis=1)
        base = xp.where(xp.isfinite(m), m, 0.0)
        s = (self._s1 * xp.exp(xp.where(xp.isfinite(self._m), self._m - base[:, None], -np.inf)))
        with np.errstate(divide="ignore"):
            return base + xp.log(s.sum(axis=1))

    @property
    def ess(self) -> Any:
        with np.errstate(divide="ignore", invalid="ignore"):
            return _squeeze(self._s1**2 / self._s2, self.groups)


class TopK:
    """The k highest logits per particle over all (t, r): ``values`` (B, k) float32 sorted
    descending, ``ref`` and ``shift`` (B, k) int64 (-1 where fewer than k were seen)."""

    def __init__(self, k: int, logits: Logits | None = None) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.logits = Logits() if logits is None else logits
        self._v: Any = None

    def update(self, diff2: Any, r0: int) -> None:
        xp = xp_of(diff2)
        B, T, rc = diff2.shape
        if self._v is None:
            self._v = xp.full((B, self.k), -np.inf, dtype=xp.float32)
            self._r = xp.full((B, self.k), -1, dtype=xp.int64)
            self._t = xp.full((B, self.k), -1, dtype=xp.int64)
        l = self.logits(diff2, r0).reshape(B, T * rc)
        if T * rc > self.k:
            part = xp.argpartition(-l, self.k - 1, axis=1)[:, : self.k]
        else:
            part = xp.broadcast_to(xp.arange(T * rc), (B, T * rc))
        v = xp.concatenate([self._v, xp.take_along_axis(l, part, axis=1)], axis=1)
        r = xp.concatenate([self._r, r0 + part % rc], axis=1)
        t = xp.concatenate([self._t, part // rc], axis=1)
        keep = xp.argpartition(-v, self.k - 1, axis=1)[:, : self.k]
        self._v, self._r, self._t = (xp.take_along_axis(a, keep, axis=1) for a in (v, r, t))

    def _order(self) -> Any:
        return xp_of(self._v).argsort(-self._v, axis=1)

    @property
    def values(self) -> Any:
        return xp_of(self._v).take_along_axis(self._v, self._order(), axis=1)

    @property
    def ref(self) -> Any:
        return xp_of(self._v).take_along_axis(self._r, self._order(), axis=1)

    @property
    def shift(self) -> Any:
        return xp_of(self._v).take_along_axis(self._t, self._order(), axis=1)


def posterior_weights(logits: Any, lse: Any) -> Any:
    """gamma = exp(logits - lse) as float32 for logits (B, ...) float32 and lse (B,) float64.

    lse is split into a float32 part m (so logits - m is exact near the maximum) and a float64
    remainder, keeping the error ~1e-7 relative even when |logits| ~ 1e5.
    """
    xp = xp_of(logits)
    lse = xp.asarray(lse, dtype=xp.float64)
    m = lse.astype(xp.float32)
    rest = (lse - m.astype(xp.float64)).astype(xp.float32)
    shape = (-1,) + (1,) * (logits.ndim - 1)
    return xp.exp((logits - m.reshape(shape)) - rest.reshape(shape))


def significant(values: Any, lse: Any, fraction: float = 0.999) -> Any:
    """RELION significant weights: mask (B, k) of the smallest leading set of descending logits
    ``values`` (B, k) whose posterior mass exp(values - lse) reaches ``fraction``
    (all k kept when the k best hold less than that)."""
    xp = xp_of(values)
    w = xp.exp(values.astype(xp.float64) - xp.asarray(lse, dtype=xp.float64)[:, None])
    before = xp.cumsum(w, axis=1) - w
    return (before < fraction) & xp.isfinite(values)


def ess(weights: Any, axis: int = -1) -> Any:
    """Effective sample size 1 / sum w^2 of weights normalised along ``axis``."""
    w = weights / weights.sum(axis=axis, keepdims=True)
    return 1.0 / (w * w).sum(axis=axis)


def class_posteriors(log_evidence: Any, log_pi: Any = None) -> tuple[Any, Any]:
    """Class posteriors p (B, K) = softmax_k(log_evidence + log_pi) and class ESS (B,).

    log_evidence: (B, K) per-class log-sum-exp (``LogSumExp(groups=class_of_ref).lse``) or
    best logit per class (force-max); log_pi: (K,) log class priors.
    """
    xp = xp_of(log_evidence)
    l = xp.asarray(log_evidence, dtype=xp.float64)
    if log_pi is not None:
        l = l + xp.asarray(log_pi, dtype=xp.float64)[None, :]
    p = xp.exp(l - l.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p, 1.0 / (p * p).sum(axis=1)


class MarginalSums:
    """M-step sums per reference from the posterior gamma = exp(l - lse) (second pass).

    particles: (B*T, 2nF) float32 [Re|Im] of X e^{+2pi i k.t/D} C w (``scoring.Particles.Y``);
    ctf2w: (B, nF) float64 C^2 w; lse: (B,) log-sum-exp of the same logits over ALL references
    (first pass). For each chunk, references whose total weight is > 0 after dropping weights
    below ``min_weight`` are passed to ``sink(refs (S,) host int64, values (S, nF) complex64,
    weights (S, nF) float64)`` with values[s] = sum_{b,t} gamma X_b e^{+2pi i k.t/D} C_b w and
    weights[s] = sum_{b,t} gamma C_b^2 w, ready for ``Accumulator3D.insert``.
    ``mass`` (B,) float64 accumulates the kept posterior mass per particle.
    """

    def __init__(
        self,
        particles: Any,
        ctf2w: Any,
        lse: Any,
        sink: Callable[[Any, Any, Any], None],
        logits: Logits | None = None,
        min_weight: float = 0.0,
    ) -> None:
        self.Y, self.ctf2w, self.sink = particles, ctf2w, sink
        self.lse = xp_of(lse).asarray(lse, dtype=xp_of(lse).float64)
        self.logits = Logits() if logits is None else logits
        self.min_weight = float(min_weight)
        self.mass = xp_of(lse).zeros(self.lse.shape, dtype=xp_of(lse).float64)

    def update(self, diff2: Any, r0: int) -> None:
        xp = xp_of(diff2)
        B, T, rc = diff2.shape
        nF = self.ctf2w.shape[1]
        l = self.logits(diff2, r0)
        gamma = posterior_weights(l, self.lse)
        if self.min_weight > 0:
            gamma = xp.where(gamma >= self.min_weight, gamma, np.float32(0.0))
        per_bt = gamma.sum(axis=1)
        self.mass += per_bt.sum(axis=1, dtype=xp.float64)
        sel = xp.flatnonzero(per_bt.sum(axis=0) > 0)
        if sel.size == 0:
            return
        g = gamma.reshape(B * T, rc)[:, sel]
        v = g.T @ self.Y
        values = xp.empty((sel.size, nF), dtype=xp.complex64)
        values.real, values.imag = v[:, :nF], v[:, nF:]
        weights = per_bt[:, sel].astype(xp.float64).T @ self.ctf2w
        self.sink(r0 + to_host(sel), values, weights)
