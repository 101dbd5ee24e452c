"""Conv-input rules of fuse.optimize_qdq (`g` is its producer/consumer index, fuse._Graph).

- ``pad_into_conv``: ``Pad(u8, zero point) -> DQ -> Conv`` (the space-to-depth stem,
  backends/stem.py) and ``DQ -> Pad(0.0) -> Conv`` become the Conv's own pads, so ORT's
  QLinearConv fusion sees DQ -> Conv (padding with the zero point is padding with 0.0).
- ``space_to_depth``: torchlib's pixel_unshuffle (Reshape -> 6-D Transpose -> Reshape: 0.85 ms
  on a u8 224x224 image in ORT's generic Transpose) feeding one int8 Conv becomes one
  SpaceToDepth (DCR channel order), the conv weight's input channels permuted to match.
"""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

__all__ = ["pad_into_conv", "space_to_depth"]


def _spatial_pads(g, pad) -> list[int] | None:
    """[top, left, bottom, right] of a constant-mode Pad on H, W of a 4-D tensor, else None."""
    if (g.attr(pad, "mode", b"constant") not in (b"constant", "constant") or len(pad.input) < 2
            or (len(pad.input) > 3 and pad.input[3])):
        return None
    p = g.const(pad.input[1])
    if p is None or p.size != 8 or (p < 0).any() or p[[0, 1, 4, 5]].any():
        return None
    return [int(p[2]), int(p[3]), int(p[6]), int(p[7])]


def _pad_value(g, pad):
    if len(pad.input) < 3 or not pad.input[2]:
        return 0
    v = g.const(pad.input[2])
    return None if v is None or v.size != 1 else v.reshape(-1)[0]


def _add_conv_pads(g, conv, extra: list[int]) -> bool:
    if conv.op_type != "Conv" or g.attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    old = list(g.attr(conv, "pads", [0, 0, 0, 0]))
    if len(old) != 4:
        return False
    new = [a + b for a, b in zip(old, extra)]
    for a in list(conv.attribute):
        if a.name == "pads":
            conv.attribute.remove(a)
    conv.attribute.append(helper.make_attribute("pads", new))
    return True


def pad_into_conv(g) -> int:
    hits = 0
    for pad in list(g.g.node):
        if pad.op_type != "Pad" or len(g.cons[pad.output[0]]) != 1:
            continue
        extra, value = _spatial_pads(g, pad), _pad_value(g, pad)
        user = g.cons[pad.output[0]][0]
        if extra is None or value is None or not g.only_user(pad.output[0], user):
            continue
        if user.op_type == "DequantizeLinear":  # Pad(q, zp) -> DQ -> Conv
            zp = g.const(user.input[2]) if len(user.input) > 2 else np.zeros(1)
            convs = g.cons[user.output[0]]
            if (zp is None or zp.size != 1 or int(value) != int(zp.reshape(-1)[0])
                    or len(convs) != 1 or not g.only_user(user.output[0], convs[0])
                    or convs[0].input[0] != user.output[0]):
                continue
            if _add_conv_pads(g, convs[0], extra):
                user.input[0] = pad.input[0]
                g.drop_shape(user.output[0])  # the DQ now reads the unpadded tensor
                hits += 1
        elif user.op_type == "Conv" and float(value) == 0.0 and user.input[0] == pad.output[0]:
            src = g.prod.get(pad.input[0])  # DQ -> Pad(0) -> Conv: let QLinearConv fuse
            if src is not None and src.op_type == "DequantizeLinear" and _add_conv_pads(g, user, extra):
                user.input[0] = pad.input[0]
                hits += 1
    g.reindex()
    return hits


def _unshuffle_block(g, r2):
    """(input, C, s) when `r2` ends torchlib's pixel_unshuffle."""
    t = g.prod.get(r2.input[0]) if r2.op_type == "Reshape" else None
    r1 = g.prod.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
    if r1 is None or r1.op_type != "Reshape" or list(g.attr(t, "perm", [])) != [0, 1, 3, 5, 2, 4]:
        return None
    s1, s2 = g.const(r1.input[1]), g.const(r2.input[1])
    if s1 is None or s2 is None or s1.size != 6 or s2.size != 4 or s1[3] != s1[5] or s1[3] < 2 \
            or s1[1] <= 0 or s2[1] != s1[1] * s1[3] * s1[3]:
        return None
    return r1.input[0], int(s1[1]), int(s1[3])


def space_to_depth(g) -> int:
    hits = 0
    for r2 in list(g.g.node):
        found = _unshuffle_block(g, r2)
        if found is None:
            continue
        x, c, s = found
        node, name = r2, r2.output[0]
        while len(g.cons[name]) == 1 and g.only_user(name, g.cons[name][0]) \
                and g.cons[name][0].op_type in ("Pad", "DequantizeLinear"):
            node = g.cons[name][0]
            name = node.output[0]
        convs = g.cons[name]
        if len(convs) != 1 or convs[0].op_type != "Conv" or convs[0].input[0] != name \
                or g.attr(convs[0], "group", 1) != 1:
            continue
        wd = g.weight_dq(convs[0].input[1])
        if wd is None or not g.only_user(wd[0].input[0], wd[0]) or not g.only_user(wd[0].output[0], convs[0]) \
                or wd[4] not in (None, 0) or wd[1].shape[1] != c * s * s:
            continue
        j = np.arange(c * s * s)  # DCR channel j = (bh*s + bw)*C + c  <-  torch's c*s*s + bh*s + bw
        src = (j % c) * s * s + j // c
        w = wd[1][:, src]
        t_init = g.inits[wd[0].input[0]]
        t_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), t_init.name))
        s2d = helper.make_node("SpaceToDepth", [x], [r2.output[0]], name=r2.name + "_s2d", blocksize=s)
        g.swap(r2, s2d)
        g.reindex()
        hits += 1
    return hits
