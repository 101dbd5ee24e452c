"""Histogram observers: HistogramObserver (percentile), MSEObserver, EntropyObserver, and the bin-merge helper.

    obs = HistogramObserver(spec, node="conv2d", percentile=99.9)
    for x in batches: obs(x)
    lo, hi = obs.range()

A distributed merge (``merge``) re-bins each rank's counts onto the global span with
``_rebinned`` and sums them, so the merged histogram is the one a single process would hold.
"""
from __future__ import annotations

import math

import torch

from ...ir.meta import QuantSpec
from .observer_base import Observer, qparams_from_range

__all__ = ["HistogramObserver", "MSEObserver", "EntropyObserver", "_rebinned"]


class HistogramObserver(Observer):
    """A 2048-bin histogram of everything seen; range clipped at a percentile.

    The histogram grows its span when a batch exceeds it, re-binning the old counts, so it
    is exact up to bin width whatever order the batches come in.
    """

    kind = "histogram"
    bins = 2048

    def __init__(self, spec: QuantSpec, node: str = "", percentile: float = 99.99):
        super().__init__(spec, node)
        self.percentile = percentile
        self.register_buffer("hist", torch.zeros(self.bins, dtype=torch.float64))
        self.lo_edge, self.hi_edge = 0.0, 0.0

    def _update(self, x: torch.Tensor) -> None:
        super()._update(x)
        lo, hi = float(self.min_val), float(self.max_val)
        if hi <= lo:
            hi = lo + 1e-8
        if self.hist.sum() == 0:
            self.lo_edge, self.hi_edge = lo, hi
        elif lo < self.lo_edge or hi > self.hi_edge:
            self._rebin(min(lo, self.lo_edge), max(hi, self.hi_edge))
        self.hist += torch.histc(x.double(), self.bins, self.lo_edge, self.hi_edge)

    def _rebin(self, lo: float, hi: float) -> None:
        self.hist = _rebinned(self.hist, self.lo_edge, self.hi_edge, lo, hi)
        self.lo_edge, self.hi_edge = lo, hi

    def dist_state(self) -> dict:
        return {**super().dist_state(), "hist": self.hist, "edges": (self.lo_edge, self.hi_edge)}

    def merge(self, states: list[dict]) -> None:
        seen = [s for s in states if s["n"] > 0]
        super().merge(states)
        if not seen:
            return
        # aligned bins: every rank's counts re-binned onto the agreed global span, then summed
        lo = min(s["edges"][0] for s in seen)
        hi = max(s["edges"][1] for s in seen)
        total = torch.zeros(self.bins, dtype=torch.float64)
        for s in seen:
            total += s["hist"] if s["edges"] == (lo, hi) else \
                _rebinned(s["hist"], s["edges"][0], s["edges"][1], lo, hi)
        self.hist, self.lo_edge, self.hi_edge = total, lo, hi

    def centers(self) -> torch.Tensor:
        w = (self.hi_edge - self.lo_edge) / self.bins
        return self.lo_edge + w * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def range(self):
        self._check_seen()
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        tail = (1.0 - self.percentile / 100.0) / 2.0
        w = (self.hi_edge - self.lo_edge) / self.bins
        i_lo = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        i_hi = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        lo = self.lo_edge + w * i_lo if i_lo > 0 else float(self.min_val)
        hi = self.lo_edge + w * (i_hi + 1) if i_hi < self.bins - 1 else float(self.max_val)
        return torch.tensor(max(lo, float(self.min_val))), torch.tensor(min(hi, float(self.max_val)))


def _rebinned(hist: torch.Tensor, lo0: float, hi0: float, lo: float, hi: float) -> torch.Tensor:
    """Counts of bins spanning [lo0, hi0] spread over as many bins spanning [lo, hi] ⊇ [lo0, hi0],
    each old bin's count split by overlap (uniform within a bin; a new bin is at least as
    wide, so an old bin meets at most two). Keeps growing or merged histograms near exact."""
    bins = hist.numel()
    edges = lo0 + (hi0 - lo0) / bins * torch.arange(bins + 1, dtype=torch.float64)
    u = ((edges - lo) / (hi - lo) * bins).clamp(0, bins)
    u0, u1 = u[:-1], u[1:]
    j = u0.floor().clamp(max=bins - 1)
    width = (u1 - u0).clamp(min=1e-300)
    first = torch.where(u1 - u0 > 0, ((j + 1).clamp(max=u1) - u0) / width, torch.ones_like(u0))
    out = torch.zeros_like(hist).index_add_(0, j.long(), hist * first)
    return out.index_add_(0, (j + 1).clamp(max=bins - 1).long(), hist * (1 - first))


class MSEObserver(HistogramObserver):
    """Range minimising the expected squared quantization error over the observed histogram."""

    kind = "mse"

    def _error(self, lo: float, hi: float) -> float:
        scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), self.spec)
        c = self.centers()
        q = torch.clamp(torch.round(c / float(scale)) + int(zp), self.spec.quant_min, self.spec.quant_max)
        err = (q - int(zp)) * float(scale) - c
        return float((self.hist * err * err).sum())

    def range(self):
        self._check_seen()
        lo0, hi0 = float(self.min_val), float(self.max_val)
        amax = max(abs(lo0), abs(hi0))

        def at(k: float):  # clip magnitudes at k% of the largest one (the smaller side only past it)
            lo, hi = max(lo0, -amax * k / 100.0), min(hi0, amax * k / 100.0)
            return self._error(lo, hi), (lo, hi), k

        cands = [(self._error(lo0, hi0), (lo0, hi0), 100.0)] + [at(float(k)) for k in range(1, 100)]
        k0 = min(cands, key=lambda t: t[0])[2]
        # then 0.05% steps around the best: the range moves smoothly with the histogram (a
        # merged distributed histogram lands where one process does, not a 1% step away)
        cands += [at(k0 + d / 20.0) for d in range(-19, 20) if d and 0 < k0 + d / 20.0 < 100]
        best = min(cands, key=lambda t: t[0])[1]
        return torch.tensor(best[0]), torch.tensor(best[1])


class EntropyObserver(HistogramObserver):
    """Threshold minimising KL(P || Q) between the |x| distribution and its quantized form
    (TensorRT's entropy calibration), applied symmetrically (or to [0, t] for x >= 0)."""

    kind = "entropy"

    def range(self):
        self._check_seen()
        lo0, hi0 = float(self.min_val), float(self.max_val)
        amax = max(abs(lo0), abs(hi0))
        if amax == 0.0:
            return self.min_val, self.max_val
        nb = self.bins
        abs_hist = torch.zeros(nb, dtype=torch.float64)
        idx = (self.centers().abs() / amax * nb).floor().clamp(0, nb - 1).long()
        abs_hist.index_add_(0, idx, self.hist)
        levels = (self.spec.quant_max - self.spec.quant_min + 1) // (1 if lo0 >= 0 else 2)
        best_i, best_kl = nb, math.inf
        for i in range(max(levels, 16), nb + 1, 16):
            p = abs_hist[:i].clone()
            p[i - 1] += abs_hist[i:].sum()
            # Q: p's first i bins merged into `levels` groups, spread back over the nonzero bins
            groups = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
            nz = (abs_hist[:i] > 0).double()
            gsum = torch.zeros(levels, dtype=torch.float64).index_add_(0, groups, abs_hist[:i])
            gcnt = torch.zeros(levels, dtype=torch.float64).index_add_(0, groups, nz)
            q = torch.where(nz > 0, (gsum / gcnt.clamp(min=1))[groups], torch.zeros_like(p))
            ps, qs = p / p.sum(), q / q.sum().clamp(min=1e-30)
            m = ps > 0
            kl = float((ps[m] * torch.log(ps[m] / qs[m].clamp(min=1e-12))).sum())
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = amax * best_i / nb
        lo = max(lo0, -t) if lo0 < 0 else lo0
        return torch.tensor(lo), torch.tensor(min(hi0, t))

