"""Space-to-depth for int8 stems: a strided conv on few input channels becomes a stride-1 conv
on s*s times the channels, exactly.

An image stem (ResNet's 7x7 stride-2 conv on 3 channels) wastes the int8 kernels of every
backend: VNNI/AMX reduce 4 (VNNI) or 64 (AMX) input bytes per instruction, and 3 channels
fill 3 of them, per tap, for 49 taps. MLAS's indirect ("ConvSym") kernel needs channels in
multiples of 4 and falls back to im2col + GEMM. Measured on an AMX host (ORT, ResNet-18, 2
threads): the stem was 18 % of the int8 model's time (1.28 ms of 6.9) and 27 % of a 50 %
channel-pruned one; rewritten, it runs in 0.75 ms and the model is 1.13x faster, bit-exact.

The rewrite, with block s = stride (2 for ResNet), on the *quantized* input (u8, so the data
moved is a quarter of float)::

    dq(xq) -> conv(w, k x k, stride s, pad p)
      ==  dq(pad(pixel_unshuffle(xq, s), zp)) -> conv(w', k' x k', stride 1, pad 0)

    w'[o, c*s*s + bh*s + bw, a, b] = w[o, c, s*a + bh - off, s*b + bw - off]  (0 outside)
    off = s*ceil(p/s) - p,  k' = ceil((k + off) / s),  pad: ceil(p/s) before, what the
    output size needs after (in the s2d grid), with the input's zero point (dequantizes to 0)

Every product of the original conv appears once in the new one, and the new ones are
products with weight 0: the int32 sums are equal, so the ORT and Inductor lowerings give
the IR's numbers. The ONNX side folds ``Pad(zp) -> DequantizeLinear -> Conv`` into the
conv's pads (fuse.py ``pad_into_conv``), so ORT runs SpaceToDepth -> QLinearConv; Inductor
fuses input quantize + unshuffle + pad into one kernel before its oneDNN qconv.

    >>> n = space_to_depth_stems(flat_gm)   # in place; returns how many convs it rewrote
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..passes.quant.convert import fetch_attr, register_tensor

__all__ = ["MAX_IN_CHANNELS", "MAX_STRIDE", "s2d_weight", "space_to_depth_stems"]

# rewrite when the conv reads at most this many input channels (the waste is in channels < 4
# per tap; with 4+ channels the kernels are already dense and s*s taps cost more than they save)
MAX_IN_CHANNELS = 3
MAX_STRIDE = 4  # measured at s = 2 (ResNet/MobileNet stems); larger patchify convs are untested
_Q = torch.ops.quantized_decomposed
_CONVS = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}


def s2d_weight(w: torch.Tensor, s: int, off: tuple[int, int], k2: tuple[int, int],
               fill: torch.Tensor | None = None) -> torch.Tensor:
    """The stride-1 weight on the unshuffled input: ``[O, C, kh, kw] -> [O, C*s*s, k2h, k2w]``,
    channel order ``c*s*s + bh*s + bw`` (torch.pixel_unshuffle's); taps outside the original
    kernel hold `fill` (per output channel; the weight's zero point, 0 for symmetric)."""
    o, c, kh, kw = w.shape
    ext = torch.empty((o, c, s * k2[0], s * k2[1]), dtype=w.dtype)
    ext[:] = (fill if fill is not None else torch.zeros(o, dtype=w.dtype)).reshape(o, 1, 1, 1).to(w.dtype)
    ext[:, :, off[0]:off[0] + kh, off[1]:off[1] + kw] = w
    # ext[o, c, s*a + bh, s*b + bw] -> out[o, c, bh, bw, a, b]
    out = ext.reshape(o, c, k2[0], s, k2[1], s).permute(0, 1, 3, 5, 2, 4)
    return out.reshape(o, c * s * s, k2[0], k2[1]).contiguous()


def _conv_args(n: fx.Node):
    """(x, w, b, stride, padding, dilation, groups) of an aten conv2d/convolution node, or None
    (transposed convolution, non-2-D)."""
    a = list(n.args)
    if n.target == torch.ops.aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = a
        if transposed:
            return None
    else:
        a += [None] * (7 - len(a))
        x, w, b, stride, padding, dilation, groups = a
        stride = stride or [1, 1]
        padding = padding or [0, 0]
        dilation = dilation or [1, 1]
        groups = groups or 1
    if isinstance(padding, str) or len(stride) != 2:
        return None
    expand = (lambda v: list(v) * 2 if len(v) == 1 else list(v))
    return x, w, b, expand(stride), expand(padding), expand(dilation), groups


def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _plan(h: int, k: int, s: int, p: int, out: int):
    """(off, k2, pad_before, pad_after) along one spatial dim, or None when the unshuffled
    conv cannot give exactly `out` outputs without cropping."""
    before = -(-p // s)
    off = s * before - p
    k2 = -(-(k + off) // s)
    after = out - 1 - before + k2 - 1 - (h // s - 1)
    if after < 0 or (h // s + before + after - k2) + 1 != out:
        return None
    return off, k2, before, after


def space_to_depth_stems(gm: fx.GraphModule, max_in_channels: int = MAX_IN_CHANNELS) -> int:
    """Rewrite, in place, every int8 conv (per-tensor u8/s8 input DQ, int8 weight DQ of a
    constant) with stride s >= 2 in both dims, no dilation, one group, at most
    `max_in_channels` input channels and static spatial sizes divisible by s. Returns the
    number rewritten; a conv outside that pattern is left as it was. An IR whose signature has
    a dynamic dim past the batch (image sizes that vary: divisibility by s unknown) is left
    whole (node.meta["val"] holds the example's sizes only)."""
    from ..ir.signature import signature
    if any(isinstance(d, str) for spec in signature(gm).inputs for d in spec.shape[1:]):
        return 0
    g, hits = gm.graph, 0
    for conv in list(g.nodes):
        if conv.op != "call_function" or conv.target not in _CONVS:
            continue
        parts = _conv_args(conv)
        if parts is None:
            continue
        x, w, b, stride, padding, dilation, groups = parts
        if (groups != 1 or dilation != [1, 1] or stride[0] != stride[1]
                or not 2 <= stride[0] <= MAX_STRIDE
                or not isinstance(x, fx.Node) or x.target != _Q.dequantize_per_tensor.default
                or not isinstance(w, fx.Node)
                or w.target not in (_Q.dequantize_per_channel.default,
                                    _Q.dequantize_per_tensor.default)):
            continue
        s = stride[0]
        src, (top, bottom, left, right) = _pre_pad(x)
        xs, ys, ws = _shape(x), _shape(conv), _shape(w)
        if xs is None or ys is None or ws is None or len(xs) != 4:
            continue
        h, wd = xs[2] - top - bottom, xs[3] - left - right  # the unshuffle's input
        padding = [padding[0] + top, padding[1] + left]  # before-pads; out fixes the after
        if not all(isinstance(d, int) for d in (h, wd, ys[2], ys[3], xs[1])) \
                or xs[1] > max_in_channels or h % s or wd % s:
            continue
        wsrc = w.args[0]
        if not (isinstance(wsrc, fx.Node) and wsrc.op == "get_attr") \
                or not _pairs_safe(fetch_attr(gm, wsrc.target)):
            continue
        plans = [_plan(d, k, s, p, o) for d, k, p, o in zip((h, wd), ws[2:], padding, ys[2:])]
        if None in plans:
            continue
        (offh, k2h, bh, ah), (offw, k2w, bw, aw) = plans
        hits += _rewrite(gm, conv, x, w, wsrc, b, s, (offh, offw), (k2h, k2w), (bh, ah, bw, aw),
                         src)
    if hits:
        g.eliminate_dead_code()
        gm.recompile()
    return hits


def _pre_pad(x: fx.Node) -> tuple:
    """(the unshuffle's source, (top, left) pads) for the conv input ``dq(xq)``: a non-negative
    int8 ``constant_pad_nd`` of H, W by the dequantize's zero point (TF-"same" padding, e.g.
    EfficientNet-Lite's stem: bottom/right 1, which made H odd) is absorbed into the plan: the
    unshuffle reads the unpadded tensor, and its own pad carries the rest. Returns (source,
    (top, bottom, left, right)); (x's source, 0s) for any other input."""
    q, none = x.args[0], (0, 0, 0, 0)
    if not (isinstance(q, fx.Node) and q.target == torch.ops.aten.constant_pad_nd.default):
        return q, none
    pads = list(q.args[1])
    value = q.args[2] if len(q.args) > 2 else q.kwargs.get("value", 0)
    zp = x.args[2]
    if (len(pads) != 4 or not all(isinstance(v, int) and v >= 0 for v in pads)
            or not isinstance(zp, int) or not isinstance(value, (int, float)) or value != zp):
        return q, none
    left, right, top, bottom = pads
    return q.args[0], (top, bottom, left, right)


def _rewrite(gm, conv, x, w, wsrc, b, s, off, k2, pads, src) -> bool:
    """Replace `conv` (False, graph untouched, where the weight's qparams are not per output
    channel on axis 0 from constants)."""
    g = gm.graph
    qw = fetch_attr(gm, wsrc.target)
    wargs = list(w.args)
    fill = None
    if w.target == _Q.dequantize_per_channel.default:
        if wargs[3] != 0:  # output channels must be the weight's axis 0
            return False
        zp = wargs[2]
        fill = fetch_attr(gm, zp.target) if isinstance(zp, fx.Node) and zp.op == "get_attr" else None
        if fill is None:
            return False
    else:
        fill = torch.full((qw.shape[0],), int(wargs[2]))
    name = register_tensor(gm, f"{wsrc.target}_s2d", s2d_weight(qw, s, off, k2, fill))
    dq_args = list(x.args)
    zp_in = dq_args[2]
    with g.inserting_before(conv):
        wattr = g.get_attr(name)
        wdq = g.call_function(w.target, (wattr, *wargs[1:]), dict(w.kwargs))
        unshuf = g.call_function(torch.ops.aten.pixel_unshuffle.default, (src, s))
        bh, ah, bw, aw = pads
        padded = unshuf
        if any(pads):
            padded = g.call_function(torch.ops.aten.constant_pad_nd.default,
                                     (unshuf, [bw, aw, bh, ah], zp_in))
        xdq = g.call_function(x.target, (padded, *dq_args[1:]), dict(x.kwargs))
        new = g.call_function(torch.ops.aten.conv2d.default,
                              (xdq, wdq, b, [1, 1], [0, 0], [1, 1], 1))
    new.meta.update({k: v for k, v in conv.meta.items() if k != "val"})
    if "val" in conv.meta:
        new.meta["val"] = conv.meta["val"]
    conv.replace_all_uses_with(new)
    g.erase_node(conv)
    return True


def _pairs_safe(q: torch.Tensor) -> bool:
    """The unshuffle reorders the weight's K axis. Without VNNI (vpmaddubsw sums adjacent
    u8 x s8 pairs into int16) an s8 weight chosen as "pairs fit" for the old order may not fit
    in the new one: rewrite there only weights within [-64, 64], whose pairs fit in any order."""
    from ..passes.quant.weight_form import PAIR_LIMIT, has_fast_s8, host_features
    if has_fast_s8(host_features()) or q.dtype != torch.int8:
        return q.dtype in (torch.int8, torch.uint8)
    return int(q.to(torch.int32).abs().max()) * 2 <= PAIR_LIMIT
