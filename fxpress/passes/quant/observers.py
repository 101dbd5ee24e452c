"""Observers: modules that watch a tensor during calibration and choose its quantization range.

    obs = HistogramObserver(spec, node="conv2d", percentile=99.9)
    for x in batches: obs(x)
    scale, zero_point = obs.qparams()

All observers pass their input through unchanged; with ``fake_quant = True`` they return the
tensor quantized and dequantized with their current qparams (used by the sensitivity
analysis to quantize one layer at a time without rewriting the graph). NaN/inf or an empty
calibration raise CalibrationError naming the node.

Under a process group (fxpress.distributed) each rank observes its shard;
``fxpress.distributed.synchronize(observers, world)`` then merges every rank's statistics so all ranks hold what
one process observing all shards would: min/max exactly, moving averages replayed in the
global batch order, histograms summed on the bins of the global range.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from ...errors import CalibrationError
from ...ir.meta import ObserverStats, QuantSpec

__all__ = ["Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver",
           "MSEObserver", "EntropyObserver", "PerChannelMinMaxObserver", "DynamicObserver",
           "make_observer", "qparams_from_range", "fake_quantize", "_fake"]

def _fake(x) -> bool:
    """True under shape propagation (a fake tensor, or any tensor while a FakeTensorMode is on)."""
    return torch._guards.detect_fake_mode(x) is not None


_EPS = torch.finfo(torch.float32).eps


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec):
    """Scale and zero point mapping [lo, hi] (widened to hold 0) onto [quant_min, quant_max]."""
    qmin, qmax = spec.quant_min, spec.quant_max
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = amax / ((qmax - qmin) / 2)
        zp = torch.full_like(scale, 0 if spec.dtype != "uint8" else (qmin + qmax + 1) // 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.clamp(scale, min=_EPS)
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    scale = torch.clamp(scale, min=_EPS)
    return scale, zp.to(torch.int64)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec,
                  axis: int | None = None) -> torch.Tensor:
    """quantize -> dequantize with the given qparams (straight-through gradient)."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.quant_min,
                                                     spec.quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zp.to(torch.int32), axis,
                                                  spec.quant_min, spec.quant_max)


class Observer(torch.nn.Module):
    """Base: running min/max, finiteness check, qparams, stats, optional fake-quant."""

    kind: ClassVar[str] = "minmax"

    def __init__(self, spec: QuantSpec, node: str = ""):
        super().__init__()
        self.spec, self.node = spec, node
        self.consumers: set[str] = set()   # annotated ops this observer serves (sensitivity)
        self.fake_quant = False           # return fq(x) with current qparams (sensitivity)
        self.observing = True             # update the range on each call
        self.batch_index = 0              # which calibration batch (set by Calibrate)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.num_batches = 0

    @property
    def axis(self) -> int | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fake(x):
            return x  # shape propagation: observers are the identity on shapes
        if self.fake_quant:
            scale, zp = self.qparams()
            return fake_quantize(x, scale, zp, self.spec, self.axis)
        if self.observing:
            self.observe(x)
        return x

    def reset(self) -> None:
        self._cached = None
        self.min_val = torch.tensor(float("inf"))
        self.max_val = torch.tensor(float("-inf"))
        self.num_batches = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            return
        x = x.detach().float()
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            bad = "NaN" if bool(torch.isnan(x).any()) else "inf"
            raise CalibrationError(f"{bad} reached the observer of node {self.node!r} during "
                                   f"calibration (batch {self.num_batches}): check the inputs and "
                                   f"the float model; a quantization range cannot hold {bad}")
        self._update(x)
        self.num_batches += 1
        self._cached = None

    def _update(self, x: torch.Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, x.min())
        self.max_val = torch.maximum(self.max_val, x.max())

    def dist_state(self) -> dict:
        """What this rank contributes to a merge (see synchronize)."""
        return {"min": self.min_val, "max": self.max_val, "n": self.num_batches}

    def merge(self, states: list[dict]) -> None:
        """Become the observer that saw every rank's batches (`states` in rank order)."""
        seen = [s for s in states if s["n"] > 0]
        self._cached = None
        self.num_batches = sum(s["n"] for s in states)
        if not seen:
            return
        # min/max of per-rank min/max is the global min/max, bit for bit
        lo, hi = seen[0]["min"], seen[0]["max"]
        for s in seen[1:]:
            lo, hi = torch.minimum(lo, s["min"]), torch.maximum(hi, s["max"])
        self.min_val, self.max_val = lo.clone(), hi.clone()

    def _check_seen(self) -> None:
        if self.num_batches == 0:
            raise CalibrationError(f"the observer of node {self.node!r} saw no data: calibration "
                                   "was empty or never reached this node; pass calibration "
                                   "batches that exercise it (a range of min = max = 0 would "
                                   "quantize everything to zero)")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range [lo, hi] this observer chooses."""
        self._check_seen()
        return self.min_val, self.max_val

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        # range searches (MSE, KL) are costly and qparams are asked for several times
        if getattr(self, "_cached", None) is None:
            lo, hi = self.range()
            self._cached = qparams_from_range(lo, hi, self.spec)
        return self._cached

    def stats(self) -> ObserverStats:
        scale, zp = self.qparams()
        return ObserverStats(self.kind, self.min_val.detach().clone(), self.max_val.detach().clone(),
                             self.num_batches, scale.detach().clone(), zp.detach().clone())

    def extra_repr(self) -> str:
        return f"node={self.node!r}, {self.spec.dtype} {self.spec.qscheme}"


class MinMaxObserver(Observer):
    """Range = the smallest and largest value seen."""

    kind = "minmax"


class MovingAverageMinMaxObserver(Observer):
    """Range = exponential moving average of per-batch min and max (robust to one odd batch)."""

    kind = "moving_average"

    def __init__(self, spec: QuantSpec, node: str = "", averaging_constant: float = 0.01):
        super().__init__(spec, node)
        self.c = averaging_constant
        # per-batch (min, max): a distributed merge replays the average in the global order
        self.batch_ranges: list[tuple[float, float]] = []

    def reset(self) -> None:
        super().reset()
        self.batch_ranges = []

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.min(), x.max()
        self._step(lo, hi)
        if self.observing:  # calibration, not every QAT training step (those sync per step)
            self.batch_ranges.append((self.batch_index, float(lo), float(hi)))

    def _step(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.num_batches == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)

    def dist_state(self) -> dict:
        return {**super().dist_state(), "ranges": list(self.batch_ranges)}

    def merge(self, states: list[dict]) -> None:
        # round-robin order: batch i of rank 0, of rank 1, ..., then batch i + 1 (a shared
        # observer sees several tensors per batch: they keep their order within the batch)
        order = sorted(((b, r, j) for r, s in enumerate(states) for j, (b, _, _) in
                        enumerate(s["ranges"])))
        self.reset()
        for b, r, j in order:
            _, lo, hi = states[r]["ranges"][j]
            # float32 tensors from the recorded float32 values: the same arithmetic, bit for bit
            self._step(torch.tensor(lo), torch.tensor(hi))
            self.batch_ranges.append((b, lo, hi))
            self.num_batches += 1


class PerChannelMinMaxObserver(Observer):
    """Per-channel min/max along `spec.axis` (weights)."""

    kind = "per_channel_minmax"

    @property
    def axis(self) -> int | None:
        return self.spec.axis

    def _update(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != self.spec.axis % x.dim()]
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        if self.num_batches == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)


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


class DynamicObserver(Observer):
    """Placeholder for run-time (dynamic) quantization: records ranges only for reports."""

    kind = "dynamic"
    is_dynamic = True

    def qparams(self):
        # weights-only sanity and reports; convert emits choose_qparams instead
        return qparams_from_range(self.min_val if self.num_batches else torch.tensor(0.0),
                                  self.max_val if self.num_batches else torch.tensor(0.0), self.spec)


_KINDS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
          "histogram": HistogramObserver, "mse": MSEObserver, "entropy": EntropyObserver}


def make_observer(spec: QuantSpec, node: str, *, weight: bool, percentile: float = 99.99) -> Observer:
    """The observer a spec asks for (weights: per-channel or per-tensor min/max)."""
    if spec.qscheme == "per_channel":
        return PerChannelMinMaxObserver(spec, node)
    if weight:
        return MinMaxObserver(spec, node)
    if spec.dynamic:
        return DynamicObserver(spec, node)
    cls = _KINDS.get(spec.observer, MinMaxObserver)
    if issubclass(cls, HistogramObserver):
        return cls(spec, node, percentile=percentile)
    return cls(spec, node)
