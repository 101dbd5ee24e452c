"""Conv / linear / addmm / embedding: producer channels meet weight inputs; outputs get weight rows.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from .._dep_builder import Builder
from .._dep_builder import arg as _arg
from .._dep_builder import where as _where
from ._common import _fill, _pair


def _conv(b: Builder, n: fx.Node, transposed: bool, groups: int, gidx: int):
    x, w = b.get(n.args[0]), b.get(n.args[1])
    bias = _arg(n, 2, "bias")
    xs = b.shape(n.args[0])
    out = [None] * len(b.shape(n))
    where = _where(n)
    for d in range(2, len(w)):
        b.block(w[d], f"kernel dims at {where}")
    if isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr":
        b.roles[(n.args[1].target, 1 if transposed else 0)] = "out"
        b.roles[(n.args[1].target, 0 if transposed else 1)] = "in"
    oc_d, ic_d = (1, 0) if transposed else (0, 1)
    cin = xs[1]
    w_o = w[oc_d]
    if groups == 1:
        if x[1] is not None and w[ic_d] is not None:
            b.union(x[1], w[ic_d], where)
        else:
            b.block(x[1], where)
            b.block(w[ic_d], where)
        out_ids = w_o
    else:
        cin_g = cin // groups
        cout = b.shape(n)[1]
        cout_g = cout // groups
        if cin_g == 1 and not transposed:  # depthwise (with multiplier): removing an input removes its outputs
            xin = x[1] if x[1] is not None else np.full(cin, -1, dtype=np.int64)
            if w_o is not None:
                b.union(np.repeat(xin, cout_g), w_o, where)
            out_ids = w_o
            b.fixups.append(("conv_groups", n, (gidx, xin, 1)))
        elif transposed:
            b.block(x[1], f"grouped transposed conv at {where}")
            b.block(w[0], where), b.block(w[1], where)
            out_ids = None
        else:  # grouped: shrink every group by the same in/out positions; groups unchanged
            if x[1] is not None and w[1] is not None:
                b.union(x[1], np.tile(w[1], groups), where)
            else:
                b.block(x[1], where), b.block(w[1], where)
            if w_o is not None:
                first = w_o.reshape(groups, cout_g)
                for g in range(1, groups):
                    b.union(first[0], first[g], where)
            out_ids = w_o
    if isinstance(bias, fx.Node):
        bi = b.get(bias)[0]
        if bias.op == "get_attr":
            b.roles[(bias.target, 0)] = "out"
        if bi is not None and out_ids is not None:
            b.union(bi, out_ids, where)
        else:
            b.block(bi, where)
    out[1] = out_ids
    b.block(x[0], where)
    return out


def _conv_nd(b, n):
    return _conv(b, n, False, _arg(n, 6, "groups", 1), 6)


def _conv_transpose(b, n):
    return _conv(b, n, True, _arg(n, 6, "groups", 1), 6)


def _convolution(b, n):
    return _conv(b, n, bool(n.args[6]), n.args[8], 8)


def _linear(b: Builder, n: fx.Node):
    x, w = b.get(n.args[0]), b.get(n.args[1])
    where = _where(n)
    if isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr":
        b.roles[(n.args[1].target, 0)] = "out"
        b.roles[(n.args[1].target, 1)] = "in"
    if x[-1] is not None and w[1] is not None:
        b.union(x[-1], w[1], where)
    else:
        b.block(x[-1], where), b.block(w[1], where)
    bias = _arg(n, 2, "bias")
    if isinstance(bias, fx.Node):
        bi = b.get(bias)[0]
        if bias.op == "get_attr":
            b.roles[(bias.target, 0)] = "out"
        if bi is not None and w[0] is not None:
            b.union(bi, w[0], where)
        else:
            b.block(bi, where)
    return list(x[:-1]) + [w[0]]


def _addmm(b: Builder, n: fx.Node):
    """bias + A @ B (HF GPT-2's Conv1D: weight stored (in, out))."""
    bias, A, B = n.args[:3]
    ia, ib = b.get(A), b.get(B)
    where = _where(n)
    if len(ia) != 2 or len(ib) != 2:
        b.block_info(ia, where), b.block_info(ib, where)
        return _fill(n)
    b.union(*_pair(ia[-1], ib[0], b.shape(A)[-1]), where)
    if isinstance(B, fx.Node) and B.op == "get_attr":
        b.roles[(B.target, 1)] = "out"
        b.roles[(B.target, 0)] = "in"
    if isinstance(bias, fx.Node):
        bi, bs = b.get(bias), b.shape(bias)
        if bias.op == "get_attr":
            b.roles[(bias.target, len(bs) - 1)] = "out"
        if bs and bs[-1] > 1:
            b.union(*_pair(bi[-1], ib[1], bs[-1]), where)
        if len(bs) == 2 and bs[0] > 1:
            b.block(bi[0], where)
    return [ia[0], ib[1]]


def _embedding(b: Builder, n: fx.Node):
    w, idx = b.get(n.args[0]), b.get(n.args[1])
    if isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
        b.roles[(n.args[0].target, 1)] = "out"
    b.block(w[0], f"embedding rows at {_where(n)}")
    return list(idx) + [w[1]]
