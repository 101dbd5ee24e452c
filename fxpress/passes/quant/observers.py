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

The base class and qparams math live in observer_base.py, the histogram family (percentile,
MSE, entropy) in histogram.py; every name is importable from here.
"""
from __future__ import annotations

import math

import torch

from ...ir.meta import QuantSpec
from .histogram import EntropyObserver, HistogramObserver, MSEObserver, _rebinned
from .observer_base import Observer, _fake, fake_quantize, qparams_from_range

__all__ = ["Observer", "MinMaxObserver", "TailMinMaxObserver", "MovingAverageMinMaxObserver",
           "HistogramObserver",
           "MSEObserver", "EntropyObserver", "PerChannelMinMaxObserver", "DynamicObserver",
           "make_observer", "qparams_from_range", "fake_quantize", "_fake", "_rebinned"]


class MinMaxObserver(Observer):
    """Range = the smallest and largest value seen."""

    kind = "minmax"


class TailMinMaxObserver(Observer):
    """Min/max, widened where the calibration is too small to have seen the tail.

    The range must hold the values of inputs calibration never saw; a handful of calibration
    samples under-estimates it (tiny-config YOLOS: the attention context of an unseen image
    reaches 1.85x the 4-image maximum, 18 dB alone). The `TAIL_KEEP` largest (smallest)
    values are kept; with k = 2 % of the n values seen (`TAIL_K` to `TAIL_KEEP`) and n p < k
    (p = `TAIL_P`), an exponential tail fitted to the top k (peaks over the threshold u, the
    (k+1)-th largest: P(X > u + t) = k/n e^(-t/e), e = their mean excess over u) gives the
    value exceeded once in 1/p, and the range takes it where it is beyond the observed one.
    A bounded tensor (ReLU6 at 6) has e ~ 0; a calibration of `TAIL_ROWS` or more samples
    (Calibrate sets `calib_samples`; else the leading-dim rows seen), or n p >= k, keeps its
    min/max (real MiniLM, 128 sentences: widening its position embeddings, dim 0 = 1, cost
    the padding=True static recipe's min cosine 0.990 -> 0.985)."""

    kind = "minmax_tail"
    TAIL_K, TAIL_SHARE, TAIL_KEEP, TAIL_P, TAIL_ROWS = 16, 0.02, 256, 1e-5, 32

    def __init__(self, spec: QuantSpec, node: str = ""):
        super().__init__(spec, node)
        self.top = torch.empty(0)       # the TAIL_KEEP + 1 largest values seen
        self.bottom = torch.empty(0)    # the TAIL_KEEP + 1 smallest
        self.count = 0                  # values seen
        self.rows = 0                   # leading-dim rows seen (samples, or samples x heads)

    def reset(self) -> None:
        super().reset()
        self.top, self.bottom, self.count, self.rows = torch.empty(0), torch.empty(0), 0, 0

    def _keep(self, old: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        both = torch.cat([old, x.flatten()])
        return both.topk(min(self.TAIL_KEEP + 1, both.numel())).values

    def _update(self, x: torch.Tensor) -> None:
        super()._update(x)
        self.top = self._keep(self.top, x)
        self.bottom = -self._keep(-self.bottom, -x)
        self.count += x.numel()
        self.rows += x.shape[0] if x.dim() > 1 else 1

    def _tail(self, top: torch.Tensor) -> float:
        """The 1-in-1/TAIL_P value of the exponential tail through `top` (descending)."""
        k = min(max(self.TAIL_K, int(self.TAIL_SHARE * self.count)), self.TAIL_KEEP)
        # the samples Calibrate fed (set after calibrating), else the leading-dim rows seen
        samples = getattr(self, "calib_samples", None) or self.rows
        if top.numel() <= k or self.count * self.TAIL_P >= k or samples >= self.TAIL_ROWS:
            return float(top[0])
        u = float(top[k])
        e = float((top[:k] - u).mean())
        return u + e * math.log(k / (self.count * self.TAIL_P))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_seen()
        lo0, hi0 = float(self.min_val), float(self.max_val)
        hi = max(hi0, self._tail(self.top))
        lo = min(lo0, -self._tail(-self.bottom))
        if lo0 < 0 < hi0 and min(-lo0, hi0) > 0.5 * max(-lo0, hi0):
            # a two-sided tensor (a linear's output) widens both sides by the larger factor:
            # the 4 samples of a tiny calibration may show the tail on one side only
            r = max(hi / hi0, lo / lo0)
            lo, hi = lo0 * r, hi0 * r
        return torch.tensor(lo), torch.tensor(hi)

    def dist_state(self) -> dict:
        return {**super().dist_state(), "top": self.top, "bottom": self.bottom, "count": self.count,
                "rows": self.rows}

    def merge(self, states: list[dict]) -> None:
        super().merge(states)
        self.top, self.bottom = torch.empty(0), torch.empty(0)
        for s in states:
            self.top = self._keep(self.top, s["top"])
            self.bottom = -self._keep(-self.bottom, -s["bottom"])
        self.count = sum(s["count"] for s in states)
        self.rows = sum(s["rows"] for s in states)


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


class DynamicObserver(Observer):
    """Placeholder for run-time (dynamic) quantization: records ranges only for reports."""

    kind = "dynamic"
    is_dynamic = True

    def qparams(self):
        # weights-only sanity and reports; convert emits choose_qparams instead
        return qparams_from_range(self.min_val if self.num_batches else torch.tensor(0.0),
                                  self.max_val if self.num_batches else torch.tensor(0.0), self.spec)


_KINDS = {"minmax": MinMaxObserver, "minmax_tail": TailMinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
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
