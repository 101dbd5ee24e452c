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

import torch

from ...ir.meta import QuantSpec
from .histogram import EntropyObserver, HistogramObserver, MSEObserver, _rebinned
from .observer_base import Observer, _fake, fake_quantize, qparams_from_range

__all__ = ["Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver",
           "MSEObserver", "EntropyObserver", "PerChannelMinMaxObserver", "DynamicObserver",
           "make_observer", "qparams_from_range", "fake_quantize", "_fake", "_rebinned"]


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
