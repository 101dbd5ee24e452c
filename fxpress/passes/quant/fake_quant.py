"""QAT fake-quant modules: observer-driven FakeQuantize (moving-average / min-max / per-channel), LSQ, make_fake_quant.

    fq = make_fake_quant(spec, "conv2d", weight=False, cfg=Quantize(mode="qat"))
    y = fq(x)        # observes while training (until freeze_after steps), always fake-quantizes

Under a process group the activation fake-quants observe the min/max over all ranks' batches
at every training step (one all_reduce each), so their ranges stay equal across ranks.
"""
from __future__ import annotations

import math

import torch

from ... import distributed
from ...ir.meta import QuantSpec
from .observers import (MinMaxObserver, MovingAverageMinMaxObserver, Observer,
                        PerChannelMinMaxObserver, _fake, fake_quantize, qparams_from_range)

__all__ = ["FakeQuantize", "FakeQuantizeMinMax", "FakeQuantizePerChannel", "LearnableFakeQuantize",
           "make_fake_quant"]


class _FakeQuantMixin:
    """Observe while training (until `freeze_after` steps) or calibrating; always fake-quantize."""

    def _fq_init(self, freeze_after: int, latest: bool):
        self.observing = False
        self.freeze_after, self.latest, self.steps = freeze_after, latest, 0

    def forward(self, x):
        if _fake(x):
            return x
        # weights (latest=True) always track the current value; activations while training
        if self.latest or self.observing or (self.training and self.steps < self.freeze_after):
            if self.latest:
                self.reset()  # weights: the range of the current weight, not of its history
            w = None if self.latest or self.observing else distributed.world()
            self.observe(x if w is None else distributed.global_range(x, w))
        if self.training:
            self.steps += 1
        self._check_seen()
        scale, zp = self.qparams()
        return fake_quantize(x, scale, zp, self.spec, self.axis)


class FakeQuantize(_FakeQuantMixin, MovingAverageMinMaxObserver):
    """Fake-quant with a moving-average min/max range (straight-through gradient)."""

    kind = "fq_moving_average"

    def __init__(self, spec, node="", freeze_after: int = 400):
        super().__init__(spec, node)
        self._fq_init(freeze_after, latest=False)


class FakeQuantizeMinMax(_FakeQuantMixin, MinMaxObserver):
    kind = "fq_minmax"

    def __init__(self, spec, node="", freeze_after: int = 400, latest: bool = False):
        super().__init__(spec, node)
        self._fq_init(freeze_after, latest=latest)


class FakeQuantizePerChannel(_FakeQuantMixin, PerChannelMinMaxObserver):
    kind = "fq_per_channel"

    def __init__(self, spec, node="", freeze_after: int = 10**9):
        super().__init__(spec, node)
        self._fq_init(freeze_after, latest=True)


class LearnableFakeQuantize(Observer):
    """LSQ (Esser et al. 2020): the scale is a parameter trained through the quantizer,
    its gradient scaled by 1/sqrt(numel * qmax); initialised from the observed range."""

    kind = "lsq"
    learned = True

    def __init__(self, spec: QuantSpec, node: str = "", channels: int = 1):
        super().__init__(spec, node)
        self.observing = False
        self.scale = torch.nn.Parameter(torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int64))

    @property
    def axis(self):
        return self.spec.axis if self.spec.qscheme == "per_channel" else None

    def observe(self, x):
        if self.axis is not None:
            self.reset()
            dims = [d for d in range(x.dim()) if d != self.axis]
            self.min_val, self.max_val = x.detach().amin(dims), x.detach().amax(dims)
            self.num_batches = 1
        else:
            super().observe(x)
        s, z = qparams_from_range(self.min_val, self.max_val, self.spec)
        with torch.no_grad():
            self.scale.copy_(s.reshape(self.scale.shape) if s.numel() == self.scale.numel()
                             else s.expand(self.scale.shape))
            self.zero_point.copy_(z.reshape(-1).expand(self.zero_point.shape))

    def merge(self, states: list[dict]) -> None:
        super().merge(states)
        if self.num_batches and self.axis is None:  # re-initialise the scale from the merged range
            s, z = qparams_from_range(self.min_val, self.max_val, self.spec)
            with torch.no_grad():
                self.scale.copy_(s.expand(self.scale.shape))
                self.zero_point.copy_(z.reshape(-1).expand(self.zero_point.shape))

    def forward(self, x):
        if _fake(x):
            return x
        if self.observing or self.num_batches == 0:  # LSQ: initialise from the first tensor seen
            self.observe(x)
        self._check_seen()
        qmin, qmax = self.spec.quant_min, self.spec.quant_max
        shape = [1] * x.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        g = 1.0 / math.sqrt(max(x.numel() // self.scale.numel(), 1) * qmax)
        s = self.scale.abs().clamp(min=1e-8)
        s = (s * g - (s * g).detach() + s.detach()).reshape(shape)   # LSQ gradient scaling
        z = self.zero_point.reshape(shape).to(x.dtype)
        v = torch.clamp(x / s + z, qmin, qmax)
        v = v + (torch.round(v) - v).detach()                          # straight-through round
        return (v - z) * s

    def qparams(self):
        self._check_seen()
        s = self.scale.detach().abs().clamp(min=1e-8)
        return (s if self.axis is not None else s.reshape(())), \
            (self.zero_point if self.axis is not None else self.zero_point.reshape(()))


def make_fake_quant(spec: QuantSpec, node: str, *, weight: bool, cfg) -> Observer:
    """The fake-quant module for one annotated tensor (per-channel weights track the latest value)."""
    if cfg.observer == "lsq":
        return _LazyLSQ(spec, node, 1) if spec.qscheme == "per_channel" \
            else LearnableFakeQuantize(spec, node, 1)
    if spec.qscheme == "per_channel":
        return FakeQuantizePerChannel(spec, node)
    if weight:
        return FakeQuantizeMinMax(spec, node, freeze_after=10**9, latest=True)
    if cfg.observer == "minmax":
        return FakeQuantizeMinMax(spec, node, freeze_after=cfg.freeze_observer_after)
    return FakeQuantize(spec, node, freeze_after=cfg.freeze_observer_after)


class _LazyLSQ(LearnableFakeQuantize):
    """Per-channel LSQ whose channel count is learned from the first tensor it sees."""

    def observe(self, x):
        c = x.shape[self.axis]
        if self.scale.numel() != c:
            self.scale = torch.nn.Parameter(torch.ones(c))
            self.zero_point = torch.zeros(c, dtype=torch.int64)
        super().observe(x)
