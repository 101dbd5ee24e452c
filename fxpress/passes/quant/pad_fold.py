"""Constant pads before convs: into the conv's own padding, or into the int8 domain.

TF-"same" networks (EfficientNet-Lite, HF MobileNetV1 with ``tf_padding=True``) call
``F.pad(x, (l, r, t, b))`` before each conv. Left float, every such pad is a float island
(DQ -> Pad -> Q) between two int8 convs. Two exact rewrites remove it:

- ``FoldPadIntoConv`` (float IR, before annotation): a zero ``pad`` / ``constant_pad_nd``
  on the spatial dims only, symmetric per dim, whose only user is a conv reading it as its
  input, becomes that conv's ``padding`` (the conv pads with 0.0 too).
- ``PadInInt8`` (after ConvertToQDQ): ``quantize(pad(x, v))`` becomes
  ``constant_pad_nd(quantize(x), q(v))`` -- quantization is elementwise, so the two are equal
  bit for bit. An asymmetric pad then runs on the uint8 tensor with the activation's zero point
  (for v = 0) and the conv reads ``dequantize(pad_u8)``: ORT's fusion folds that Pad into the
  QLinearConv's pads (backends/onnx/fuse_conv.py ``pad_into_conv``), Inductor and TVM pad bytes.
  The ``quantize(dequantize(...))`` left before the pad is FoldQDQ's to simplify (run after).

    gm = FoldPadIntoConv().run(gm, ctx).graph_module     # pad [1,1,1,1] -> conv padding 1
    gm = PadInInt8().run(gm, ctx).graph_module           # pad [0,1,0,1] -> uint8 pad of zp
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)
import torch.fx as fx

from ...ir.meta import lineage, set_record
from ..base import Pass, PassContext, PassResult
from ..rewrite import NodeRule, apply_rules

__all__ = ["FoldPadIntoConv", "PadInInt8", "PAD_OPS", "pad_args"]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
PAD_OPS = {aten.pad.default, aten.constant_pad_nd.default}
_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


def pad_args(node: fx.Node) -> tuple[fx.Node, list[int], float] | None:
    """(input, pads, value) of a constant-mode pad node, else None (reflect, replicate ...)."""
    if node.op != "call_function" or node.target not in PAD_OPS or not isinstance(node.args[0], fx.Node):
        return None
    args = list(node.args) + [None] * 4
    pads = node.kwargs.get("pad", args[1])
    if node.target is aten.pad.default:
        mode = node.kwargs.get("mode", args[2] or "constant")
        value = node.kwargs.get("value", args[3])
        if mode != "constant":
            return None
    else:
        value = node.kwargs.get("value", args[2])
    if not isinstance(pads, (list, tuple)) or not all(isinstance(p, int) for p in pads):
        return None
    return node.args[0], list(pads), float(value or 0.0)


def _conv_padding(conv: fx.Node, nd: int) -> list[int] | None:
    args = list(conv.args) + [None] * 7
    padding = conv.kwargs.get("padding", args[4])
    if padding is None:
        return [0] * nd
    if isinstance(padding, int):
        return [padding] * nd
    if isinstance(padding, (list, tuple)) and all(isinstance(p, int) for p in padding):
        return list(padding) * nd if len(padding) == 1 else list(padding)
    return None  # 'same' / 'valid' strings, symbolic values


def _fold_into_conv(gm: fx.GraphModule, pad: fx.Node):
    found = pad_args(pad)
    if found is None or len(pad.users) != 1:
        return None
    x, pads, value = found
    (conv,) = pad.users
    nd = _CONVS.get(conv.target)
    if nd is None or conv.args[0] is not pad or value != 0.0 or len(pads) > 2 * nd or len(pads) % 2:
        return None
    lo, hi = pads[0::2], pads[1::2]            # last dim first, as F.pad orders them
    if lo != hi or min(lo, default=0) < 0:
        return None
    old = _conv_padding(conv, nd)
    if old is None:
        return None
    extra = [0] * (nd - len(lo)) + list(reversed(lo))  # leading spatial dims unpadded
    args = list(conv.args) + [None] * (7 - len(conv.args))
    defaults = [None, None, None, [1] * nd, [0] * nd, [1] * nd, 1]
    args = [a if a is not None or i < 3 else defaults[i] for i, a in enumerate(args)]
    args[4] = [a + b for a, b in zip(old, extra)]
    kwargs = {k: v for k, v in conv.kwargs.items() if k != "padding"}
    conv.args = tuple([x] + args[1:])
    conv.kwargs = kwargs
    return pad                                  # the conv reads x now; DCE drops the pad


def _quantized_value(q: fx.Node, value: float) -> int:
    out = q.target(torch.tensor([value]), *q.args[1:6])
    return int(out.reshape(-1)[0])


def _pad_then_quantize(gm: fx.GraphModule, q: fx.Node):
    pad = q.args[0]
    found = pad_args(pad) if isinstance(pad, fx.Node) else None
    if found is None or len(pad.users) != 1 or not all(isinstance(a, (int, float)) for a in q.args[1:5]):
        return None
    x, pads, value = found
    g = gm.graph
    with g.inserting_before(q):
        qx = g.call_function(q.target, (x,) + tuple(q.args[1:]), dict(q.kwargs))
        new = g.call_function(aten.constant_pad_nd.default, (qx, pads, _quantized_value(q, value)))
    for rec in (q.meta.get("fxpress") or {}).values():
        set_record(qx, rec)                     # QuantSpec / ObserverStats of the activation
    if lineage(pad) is not None:
        set_record(new, lineage(pad).derived("pad:int8"))
    xv, pv, dtype = x.meta.get("val"), pad.meta.get("val"), q.args[5]
    if isinstance(xv, torch.Tensor) and isinstance(pv, torch.Tensor):
        qx.meta["val"] = xv.to(dtype)
        new.meta["val"] = pv.to(dtype)
    return new


FOLD_RULES = [NodeRule("pad_into_conv_padding", PAD_OPS, _fold_into_conv)]
INT8_RULES = [NodeRule("pad_in_int8", {qd.quantize_per_tensor.default}, _pad_then_quantize)]


@dataclass(frozen=True)
class FoldPadIntoConv(Pass):
    """A symmetric zero pad whose only user is a conv becomes the conv's padding (exact)."""

    name: ClassVar[str] = "quant_fold_pad"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        hits = apply_rules(gm, FOLD_RULES)["pad_into_conv_padding"]
        return PassResult(gm, bool(hits), {"folded_pads": hits})


@dataclass(frozen=True)
class PadInInt8(Pass):
    """quantize(pad(x, v)) -> constant_pad_nd(quantize(x), quantize(v)) (exact; run before FoldQDQ)."""

    name: ClassVar[str] = "quant_pad_int8"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        hits = apply_rules(gm, INT8_RULES)["pad_in_int8"]
        float_pads = sum(1 for n in gm.graph.nodes if pad_args(n) is not None
                         and isinstance(v := n.meta.get("val"), torch.Tensor) and v.is_floating_point())
        return PassResult(gm, bool(hits), {"int8_pads": hits, "float_pads_left": float_pads})
