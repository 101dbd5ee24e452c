"""CrossLayerEqualize: equalize channel ranges across conv -> (ReLU/ReLU6) -> depthwise conv.

Cross-layer equalization (Nagel et al. 2019; AIMET, NNCF) uses the positive homogeneity of
ReLU: ``relu(s * y) = s * relu(y)`` for s > 0, so scaling output channel i of the first conv by
``s_i`` (weight row and bias) and input channel i of the second by ``1 / s_i`` is the same
function. The classic rule equalizes the two convs' *weight* ranges for per-tensor weight
quantization. fxpress quantizes weights per output channel, and both sides here are per
channel in that sense (the first conv's rows, the depthwise conv's filters), so any ``s_i``
leaves the weight quantization alone; what the scaling can still fix is the *activation*
between them, which is quantized per tensor: a channel whose range is a small share of the
tensor's range keeps few of its 256 levels. Per channel: ``s_i = R / r_i`` (capped at
`max_scale`), ``r_i`` the channel's calibrated range and ``R`` the largest; every channel then
spans the whole int8 range. With per-tensor weights (``weights="int8-per-tensor-*"``) the
classic weight-range rule ``s_i = sqrt(r1_i * r2_i) / r1_i`` is used instead.

ReLU6 / hardtanh(0, 6) clip at 6, which is not scale-invariant: a channel is scaled only when
its calibrated pre-activation maximum times ``s_i`` stays below the clip (exact on the
calibration data; a later input above the calibrated range is clipped earlier, as a
quantizer's range would clip it anyway). A zero ``pad`` between the activation and the
depthwise conv is scale-invariant and allowed. ``report["cle"]`` lists each pair with its
range spread before and after.

    fxpress.Quantize(mode="static", equalize=True)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import module_path
from ..base import Pass, PassContext, PassResult
from .calibrate import calibration_batches, check_batch
from .convert import fetch_attr
from .observers import _fake
from .pad_fold import pad_args

__all__ = ["CrossLayerEqualize", "equalize_pairs"]

aten = torch.ops.aten
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_RELU = {aten.relu.default, aten.relu_.default}
_CLIP = {aten.hardtanh.default, aten.hardtanh_.default, aten.relu6.default, aten.clamp.default}


class _ChannelMax(torch.nn.Module):
    """Running per-channel (dim 1) maximum of what passes through."""

    def __init__(self):
        super().__init__()
        self.amax = None

    def forward(self, x):
        if not _fake(x):
            a = x.detach().transpose(0, 1).reshape(x.shape[1], -1).amax(1)
            self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        return x


def _groups(conv: fx.Node) -> int:
    args = list(conv.args) + [None] * 7
    return int(conv.kwargs.get("groups", args[6] or 1))


def _clip_max(act: fx.Node) -> float | None:
    """The upper clip of a ReLU-like op (inf for ReLU), None when its lower clip is not 0."""
    if act.target in _RELU:
        return float("inf")
    if act.target is aten.relu6.default:
        return 6.0
    args = list(act.args) + [None, None]
    lo = act.kwargs.get("min_val", act.kwargs.get("min", args[1]))
    hi = act.kwargs.get("max_val", act.kwargs.get("max", args[2]))
    if act.target in (aten.hardtanh.default, aten.hardtanh_.default):
        lo = -1.0 if lo is None else lo
        hi = 1.0 if hi is None else hi
    if lo != 0 or not isinstance(hi, (int, float)):
        return None
    return float(hi)


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def equalize_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node | None, fx.Node]]:
    """(conv, activation or None, depthwise conv) chains whose channels can be rescaled."""
    pairs = []
    for c1 in gm.graph.nodes:
        if c1.op != "call_function" or c1.target not in _CONV or len(c1.args) < 2:
            continue
        w1 = c1.args[1]
        if not (isinstance(w1, fx.Node) and w1.op == "get_attr" and len(w1.users) == 1):
            continue
        b1 = c1.args[2] if len(c1.args) > 2 else None
        if b1 is not None and not (isinstance(b1, fx.Node) and b1.op == "get_attr" and len(b1.users) == 1):
            continue
        act = _only_user(c1)
        node, relu = act, None
        if act is not None and act.op == "call_function" and (act.target in _RELU or act.target in _CLIP):
            if _clip_max(act) is None:
                continue
            relu, node = act, _only_user(act)
        if node is not None and pad_args(node) is not None and pad_args(node)[2] == 0.0:
            node = _only_user(node)
        c2 = node
        if c2 is None or c2.target not in _CONV or len(c2.args) < 2:
            continue
        w2 = c2.args[1]
        if not (isinstance(w2, fx.Node) and w2.op == "get_attr" and len(w2.users) == 1):
            continue
        channels = fetch_attr(gm, w1.target).shape[0]
        if _groups(c2) != channels or fetch_attr(gm, w2.target).shape[0] % channels:
            continue  # not depthwise over c1's channels
        pairs.append((c1, relu, c2))
    return pairs


@dataclass(frozen=True)
class CrossLayerEqualize(Pass):
    """Rescale conv -> act -> depthwise conv channels so the activation's channels share one range."""

    name: ClassVar[str] = "quant_cle"
    config: Any = None
    max_scale: float = 32.0
    strength: float = 0.5

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        pairs = equalize_pairs(gm)
        if not pairs:
            ctx.report["cle"] = []
            return PassResult(gm, False, {"equalized": 0})
        probes: dict[fx.Node, fx.Node] = {}
        for i, c1 in enumerate(c for c, _, _ in pairs):
            target = f"_fxq_cle_probe_{i}"
            gm.add_submodule(target, _ChannelMax())
            with gm.graph.inserting_after(c1):
                probes[c1] = gm.graph.call_module(target, (c1,))
            for u in list(c1.users):
                if u is not probes[c1]:
                    u.replace_input_with(c1, probes[c1])
        gm.recompile()
        try:
            with torch.no_grad():
                for i, b in calibration_batches(ctx, self.config, required=True):
                    check_batch(gm, b, i)
                    gm(*b)
            maxima = {c1: gm.get_submodule(p.target).amax for c1, p in probes.items()}
        finally:
            for c1, p in probes.items():
                p.replace_all_uses_with(c1)
                gm.graph.erase_node(p)
                delattr(gm, str(p.target))
            gm.recompile()
        per_channel_w = self.config is None or self.config.weights.startswith("int8-per-channel")
        rows, done = [], 0
        for c1, act, c2 in pairs:
            m = maxima[c1]
            if m is None:
                continue
            s = self._scales(gm, c1, act, c2, m, per_channel_w)
            if s is None:
                continue
            self._apply(gm, c1, c2, s)
            hi = _clip_max(act) if act is not None else float("inf")
            r = m.clamp(min=0, max=hi) if act is not None else m.abs()
            live = r > 0
            rows.append({"conv": module_path(c1) or c1.name, "depthwise": module_path(c2) or c2.name,
                         "range_spread_before": round(float(r[live].max() / r[live].min()), 2) if live.any() else 1.0,
                         "range_spread_after": round(float((r * s)[live].max() / (r * s)[live].min()), 2)
                         if live.any() else 1.0,
                         "max_scale": round(float(s.max()), 2)})
            done += 1
        ctx.report["cle"] = rows
        return PassResult(gm, done > 0, {"equalized": done, "pairs": len(pairs)})

    def _scales(self, gm, c1, act, c2, m: torch.Tensor, per_channel_w: bool) -> torch.Tensor | None:
        hi = _clip_max(act) if act is not None else float("inf")
        if act is None:
            return None  # no ReLU: a conv -> depthwise conv pair has signed activations; skip
        r = m.clamp(min=0, max=hi)
        live = r > 1e-8
        if not live.any():
            return None
        if per_channel_w:
            s = torch.ones_like(r)
            s[live] = ((r[live].max() / r[live]) ** self.strength).clamp(max=self.max_scale)
        else:
            w1 = fetch_attr(gm, c1.args[1].target)
            w2 = fetch_attr(gm, c2.args[1].target)
            r1 = w1.detach().abs().reshape(w1.shape[0], -1).amax(1)
            r2 = w2.detach().abs().reshape(r1.shape[0], -1).amax(1)
            s = (torch.sqrt(r1 * r2) / r1.clamp(min=1e-12)).clamp(1 / self.max_scale, self.max_scale)
            s[~live] = 1.0
        if hi != float("inf"):
            # keep the clip where it was: only channels that never reached it, and only up to it
            room = (hi / m.clamp(min=1e-12)).clamp(min=1.0)
            s = torch.where(m < hi, torch.minimum(s, room), torch.ones_like(s))
        return s if bool((s != 1).any()) else None

    @staticmethod
    def _apply(gm: fx.GraphModule, c1: fx.Node, c2: fx.Node, s: torch.Tensor) -> None:
        w1 = fetch_attr(gm, c1.args[1].target)
        w2 = fetch_attr(gm, c2.args[1].target)
        with torch.no_grad():  # the IR owns its params (cloned at capture)
            w1.mul_(s.reshape(-1, *[1] * (w1.dim() - 1)).to(w1.dtype))
            if len(c1.args) > 2 and isinstance(c1.args[2], fx.Node):
                b1 = fetch_attr(gm, c1.args[2].target)
                b1.mul_(s.to(b1.dtype))
            mult = w2.shape[0] // s.shape[0]
            w2.mul_((1.0 / s).repeat_interleave(mult).reshape(-1, *[1] * (w2.dim() - 1)).to(w2.dtype))
