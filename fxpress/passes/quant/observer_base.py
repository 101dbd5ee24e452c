"""Observer base: the qparams math (range -> scale/zero point, fake quantization) and the Observer module.

    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(3.0), spec)
    y = fake_quantize(x, scale, zp, spec)          # quantize -> dequantize, straight-through

Every observer in observers.py / histogram.py derives from ``Observer``; the public names are
re-exported from ``fxpress.passes.quant.observers``.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ...errors import CalibrationError
from ...ir.meta import ObserverStats, QuantSpec

__all__ = ["Observer", "qparams_from_range", "fake_quantize", "_fake"]


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

