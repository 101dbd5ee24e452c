"""Channel-coupling rules for dependency analysis, one per ATen op family (a table keyed by op).

A node's `info` is a list with one entry per dim of its value: an int64 array of
channel-element ids (-1 where an index belongs to no prunable channel) or None when
the dim carries no channels. Rules union ids (same channel) or block them (the size
of that dim may not change), and record *fixups*: shape constants (view sizes, split
sizes, conv groups, head counts) to recompute after pruning.
"""
from __future__ import annotations

import operator
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from ._dep_builder import Builder, Multi, arg as _arg, has_ids as _has_ids, shape
from ._dep_builder import tensor_args as _tensor_args, where as _where

__all__ = ["RULES"]

aten = torch.ops.aten


# ---- rules ------------------------------------------------------------------------------
def _same(b: Builder, n: fx.Node) -> list | None:
    i = b.get(_tensor_args(n)[0])
    return list(i) if isinstance(i, list) else None


def _getitem(b: Builder, n: fx.Node):
    src = b.info.get(n.args[0])
    if isinstance(src, Multi):
        return src[n.args[1]]
    if _has_ids(src):
        b._unknown(n, "getitem of a single tensor")
    return _fill(n)


def _fill(n):
    s = shape(n)
    return [None] * len(s) if s is not None else None


def _merge_dim(b: Builder, n: fx.Node, arrs: list, fixed: bool, where: str):
    arrs = [a for a in arrs if a is not None]
    if not arrs:
        return None
    for o in arrs[1:]:
        b.union(arrs[0], o, where)
    if fixed:
        for a in arrs:
            b.block(a, f"coupled to a fixed-size tensor at {where}")
    return arrs[0]


def _elementwise(b: Builder, n: fx.Node):
    out_s = b.shape(n)
    if out_s is None:
        return None
    ins = [a for a in _tensor_args(n) if b.shape(a) is not None]
    r = len(out_s)
    out = [None] * r
    for d in range(r):
        if out_s[d] == 1:
            continue
        arrs, fixed = [], False
        for a in ins:
            s, k = b.shape(a), d - (r - len(b.shape(a)))
            if k < 0 or s[k] == 1:
                continue
            ia = b.get(a)[k]
            if ia is None:
                fixed = True
            else:
                arrs.append(ia)
        out[d] = _merge_dim(b, n, arrs, fixed and bool(arrs), _where(n))
    if sum(1 for a in ins if _has_ids(b.get(a))) > 1:
        b.event(n, str(n.target).split(".")[1], [x for x in out if x is not None])
    return out


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


def _norm_params(b: Builder, n: fx.Node, chans: np.ndarray | None, params, role: str):
    where = _where(n)
    for p in params:
        if isinstance(p, fx.Node):
            pi = b.get(p)[0] if b.get(p) else None
            if isinstance(p, fx.Node) and p.op == "get_attr":
                b.roles[(p.target, 0)] = role
            if pi is not None and chans is not None:
                b.union(chans, pi, where)
            else:
                b.block(pi, where), b.block(chans, where)


def _batch_norm(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    _norm_params(b, n, x[1], n.args[1:3], "bn")
    _norm_params(b, n, x[1], n.args[3:5], "norm")
    return list(x)


def _layer_norm(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    k = len(n.args[1])
    if k == 1:
        _norm_params(b, n, x[-1], [_arg(n, 2, "weight"), _arg(n, 3, "bias")], "norm")
        if x[-1] is not None:
            b.fixups.append(("layer_norm", n, [x[-1]]))
    else:
        for d in range(len(x) - k, len(x)):
            b.block(x[d], f"multi-dim layer_norm at {_where(n)}")
        for p in (_arg(n, 2, "weight"), _arg(n, 3, "bias")):
            b.block_info(b.get(p), f"multi-dim layer_norm at {_where(n)}")
    return list(x)


def _group_norm(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    groups = n.args[1]
    c = x[1]
    if c is not None and groups > 1:  # keep the group count: remove the same positions in each
        per = c.reshape(groups, -1)
        for g in range(1, groups):
            b.union(per[0], per[g], _where(n))
    _norm_params(b, n, c, [_arg(n, 2, "weight"), _arg(n, 3, "bias")], "norm")
    return list(x)


def _blocks(a, bshape):
    i = j = 0
    out = []
    while i < len(a) or j < len(bshape):
        idims, odims, pa, pb = [], [], 1, 1
        if i < len(a):
            idims.append(i); pa *= a[i]; i += 1
        if j < len(bshape):
            odims.append(j); pb *= bshape[j]; j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                idims.append(i); pa *= a[i]; i += 1
            elif j < len(bshape):
                odims.append(j); pb *= bshape[j]; j += 1
            else:
                raise ValueError("reshape sizes do not match")
        out.append((idims, odims))
    return out


def _reshape(b: Builder, n: fx.Node, fixup_kind: str | None = "view"):
    x = b.get(n.args[0])
    ins, outs = b.shape(n.args[0]), b.shape(n)
    out = [None] * len(outs)
    where = _where(n)
    try:
        blocks = _blocks(ins, outs)
    except (ValueError, IndexError):
        b.block_info(x, f"unresolved: reshape at {where}")
        return out
    for idims, odims in blocks:
        carriers = [d for d in idims if x[d] is not None]
        if not carriers:
            continue
        if len(carriers) > 1:
            for d in carriers:
                b.block(x[d], f"reshape mixes two channel dims at {where}")
            continue
        c = carriers[0]
        bshape = [1] * len(idims)
        bshape[idims.index(c)] = ins[c]
        full = np.broadcast_to(x[c].reshape(bshape), [ins[d] for d in idims])
        full = full.reshape([outs[d] for d in odims])
        big = [k for k, d in enumerate(odims) if outs[d] > 1]
        if len(big) == 1:
            out[odims[big[0]]] = full.reshape(-1).copy()
            continue
        k0 = big[0]
        moved = np.moveaxis(full, k0, 0).reshape(outs[odims[k0]], -1)
        rep = moved[:, 0].copy()
        if (moved != rep[:, None]).any():  # a channel dim split in two: the outer dim (heads) is the unit
            for j in range(1, moved.shape[1]):
                b.union(moved[:, 0].copy(), moved[:, j].copy(), where)
            b.event(n, "heads", [rep])
        out[odims[k0]] = rep
    if fixup_kind and any(o is not None for o in out):
        b.fixups.append((fixup_kind, n, out))
    return out


def _view(b, n):
    return _reshape(b, n, "view")


def _no_const_reshape(b, n):  # flatten / squeeze / unsqueeze: sizes follow from the input
    return _reshape(b, n, None)


def _unflatten(b, n):
    return _reshape(b, n, "unflatten")


def _expand(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    ins, outs = b.shape(n.args[0]), b.shape(n)
    r = len(outs)
    out = [None] * r
    for d in range(r):
        k = d - (r - len(ins))
        if k >= 0 and ins[k] == outs[d]:
            out[d] = x[k]
    if any(o is not None for o in out):
        b.fixups.append(("view", n, out))
    return out


def _permute(b, n):
    x = b.get(n.args[0])
    return [x[d] for d in n.args[1]]


def _transpose(b, n):
    x = list(b.get(n.args[0]))
    r = len(x)
    d0, d1 = n.args[1] % r, n.args[2] % r
    x[d0], x[d1] = x[d1], x[d0]
    return x


def _t(b, n):
    return list(reversed(b.get(n.args[0])))


def _cat(b: Builder, n: fx.Node):
    ts = [t for t in n.args[0] if isinstance(t, fx.Node) and b.shape(t) is not None and b.shape(t) != (0,)]
    r = len(b.shape(n))
    dim = _arg(n, 1, "dim", 0) % r
    out = [None] * r
    where = _where(n)
    for d in range(r):
        if d == dim:
            parts = [b.get(t)[d] if b.get(t)[d] is not None else np.full(b.shape(t)[d], -1, np.int64)
                     for t in ts]
            if any(b.get(t)[d] is not None for t in ts):
                out[d] = np.concatenate(parts)
                b.event(n, "cat", [out[d]])
        else:
            arrs = [b.get(t)[d] for t in ts]
            fixed = any(a is None for a in arrs) and b.shape(n)[d] > 1
            out[d] = _merge_dim(b, n, arrs, fixed, where)
    return out


def _split(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    outs = n.meta.get("val")
    r = len(x)
    dim = (_arg(n, 2, "dim", 0) if n.target is not aten.unbind.int else _arg(n, 1, "dim", 0)) % r
    sizes = [int(o.shape[dim]) for o in outs]
    res, off = Multi(), 0
    pieces = []
    for s in sizes:
        o = list(x)
        if x[dim] is not None:
            o[dim] = x[dim][off:off + s]
            pieces.append(o[dim])
        off += s
        res.append(o)
    if x[dim] is not None:
        if n.target is aten.unbind.int:
            b.block(x[dim], f"unbind over channels at {_where(n)}")
            return Multi([[*o[:dim], *o[dim + 1:]] for o in res])
        b.fixups.append(("split", n, (dim, pieces)))
        b.event(n, "split", [x[dim]])
    return res


def _slice(b: Builder, n: fx.Node):
    x = list(b.get(n.args[0]))
    r = len(x)
    dim = _arg(n, 1, "dim", 0) % r
    if x[dim] is None:
        return x
    start, end, step = _arg(n, 2, "start", None), _arg(n, 3, "end", None), _arg(n, 4, "step", 1)
    if step != 1 or not all(isinstance(v, (int, type(None))) for v in (start, end)):
        b.block(x[dim], f"strided/symbolic slice over channels at {_where(n)}")
        x[dim] = None
        return x
    sl = slice(start, end).indices(len(x[dim]))
    b.fixups.append(("slice", n, (x[dim], sl[0], sl[1])))
    b.event(n, "slice", [x[dim]])
    x[dim] = x[dim][sl[0]:sl[1]]
    return x


def _select(b: Builder, n: fx.Node):
    x = list(b.get(n.args[0]))
    dim, idx = n.args[1] % len(x), n.args[2]
    if x[dim] is not None:
        b.block(x[dim][idx:idx + 1], f"select of one channel at {_where(n)}")
        b.fixups.append(("select", n, x[dim]))
    return x[:dim] + x[dim + 1:]


def _reduce(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    outs = b.shape(n)
    dims = _arg(n, 1, "dim", None)
    r = len(x)
    if dims is None or dims == []:
        dims = list(range(r))
    dims = {d % r for d in ([dims] if isinstance(dims, int) else dims)}
    val = n.meta.get("val")
    rank = len(val[0].shape) if isinstance(val, (tuple, list)) else len(outs)
    keep = [x[d] for d in range(r) if d not in dims] if rank < r else \
        [None if d in dims else x[d] for d in range(r)]
    return Multi([keep, list(keep)]) if isinstance(val, (tuple, list)) else keep


def _spatial(b: Builder, n: fx.Node):
    """Pooling / upsampling / padding: batch and channel dims pass, the rest may not carry channels."""
    x = b.get(n.args[0])
    out_s = b.shape(n) if b.shape(n) is not None else b.shape(n.args[0])
    out = [None] * len(x)
    for d in range(len(x)):
        if d < 2 and out_s is not None and len(out_s) == len(x):
            out[d] = x[d]
        else:
            b.block(x[d], f"spatial op over channels at {_where(n)}")
    if isinstance(n.meta.get("val"), (tuple, list)):
        return Multi([list(out), list(out)])
    return out


def _pad(b: Builder, n: fx.Node):
    x = list(b.get(n.args[0]))
    k = len(n.args[1]) // 2
    for d in range(len(x) - k, len(x)):
        if x[d] is not None:
            b.block(x[d], f"padding over channels at {_where(n)}")
            x[d] = None
    return x


def _matmul(b: Builder, n: fx.Node):
    A, B = n.args[0], n.args[1]
    ia, ib = b.get(A), b.get(B)
    sa, sb, so = b.shape(A), b.shape(B), b.shape(n)
    where = _where(n)
    if len(sa) < 2 or len(sb) < 2:
        b.block_info(ia, where), b.block_info(ib, where)
        return _fill(n)
    b.union(*_pair(ia[-1], ib[-2], sa[-1]), where)
    r = len(so)
    out = [None] * r
    for d in range(r - 2):
        arrs, fixed = [], False
        for i_, s_ in ((ia, sa), (ib, sb)):
            k = d - (r - len(s_))
            if k < 0 or s_[k] == 1:
                continue
            (arrs.append(i_[k]) if i_[k] is not None else None)
            fixed |= i_[k] is None
        out[d] = _merge_dim(b, n, arrs, fixed and bool(arrs), where)
    out[-2], out[-1] = ia[-2], ib[-1]
    if _has_ids(ia) and _has_ids(ib):
        b.event(n, "matmul", [o for o in out if o is not None])
    return out


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


def _pair(a, c, size):
    a = a if a is not None else np.full(size, -1, np.int64)
    c = c if c is not None else np.full(size, -1, np.int64)
    return a, c


def _sdpa(b: Builder, n: fx.Node):
    q, k, v = (b.get(a) for a in n.args[:3])
    sq, sk, sv, so = (b.shape(a) for a in (*n.args[:3], n))
    where = _where(n)
    if n.kwargs.get("enable_gqa"):
        for i in (q, k, v):
            b.block_info(i, f"unresolved: grouped-query attention at {where}")
        return _fill(n)
    b.union(*_pair(q[-1], k[-1], sq[-1]), where)
    b.union(*_pair(k[-2], v[-2], sk[-2]), where)
    r = len(so)
    out = [None] * r
    mask = _arg(n, 3, "attn_mask")
    extra = [mask] if isinstance(mask, fx.Node) else []
    for d in range(r - 2):
        arrs, fixed = [], False
        for a in [*n.args[:3], *extra]:
            s_ = b.shape(a)
            kk = d - (r - len(s_))
            if kk < 0 or s_[kk] == 1:
                continue
            ia = b.get(a)[kk]
            (arrs.append(ia) if ia is not None else None)
            fixed |= ia is None
        out[d] = _merge_dim(b, n, arrs, fixed and bool(arrs), where)
    out[-2], out[-1] = q[-2], v[-1]
    b.event(n, "attention", [o for o in out if o is not None])
    return out


def _embedding(b: Builder, n: fx.Node):
    w, idx = b.get(n.args[0]), b.get(n.args[1])
    if isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
        b.roles[(n.args[0].target, 1)] = "out"
    b.block(w[0], f"embedding rows at {_where(n)}")
    return list(idx) + [w[1]]


def _sym_size(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    if x and x[n.args[1]] is not None:
        b.block(x[n.args[1]], f"size read at {_where(n)}")
    return None


def _ignore(b, n):
    return None


_UNARY = ["relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_",
          "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "mish", "dropout", "clone",
          "contiguous", "alias", "detach", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "erf",
          "sin", "cos", "sign", "reciprocal", "square", "logical_not", "softplus", "relu6",
          "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
          "native_dropout", "feature_dropout", "alpha_dropout", "gelu_", "relu6_",
          "_to_copy", "to", "type_as", "lift_fresh_copy", "softmax", "log_softmax", "_softmax",
          "_log_softmax", "clamp", "clamp_min", "clamp_max", "pow", "round", "floor", "ceil",
          "nan_to_num", "dropout_", "_assert_tensor_metadata", "cumsum"]
_ELEMENTWISE = ["add", "sub", "mul", "div", "where", "maximum", "minimum", "eq", "ne", "lt", "le",
                "gt", "ge", "masked_fill", "rsub", "bitwise_and", "bitwise_or", "logical_and",
                "logical_or", "fmod", "remainder", "lerp", "addcmul", "addcdiv", "floor_divide",
                "true_divide", "add_", "mul_", "copy"]


def _all_overloads(names: list[str], rule: Callable) -> dict:
    out = {}
    for name in names:
        pkt = getattr(aten, name, None)
        if pkt is None:
            continue
        for ov in pkt.overloads():
            out[getattr(pkt, ov)] = rule
    return out


def _unary(b, n):
    if "cumsum" in str(n.target) or "softmax" in str(n.target):
        return _same(b, n)  # normalizing over channels keeps shapes; values change as pruning does
    return _elementwise(b, n) if len(_tensor_args(n)) > 1 else _same(b, n)


RULES: dict = {operator.getitem: _getitem}
RULES.update(_all_overloads(_UNARY, _unary))
RULES.update(_all_overloads(_ELEMENTWISE, _elementwise))
RULES.update(_all_overloads(["mean", "sum", "amax", "amin", "var", "std", "prod", "max", "min",
                             "logsumexp"], _reduce))
RULES.update(_all_overloads(["view", "reshape", "_unsafe_view", "view_copy", "_reshape_alias"], _view))
RULES.update(_all_overloads(["flatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"], _no_const_reshape))
RULES.update(_all_overloads(["unflatten"], _unflatten))
RULES.update(_all_overloads(["expand", "expand_copy"], _expand))
RULES.update(_all_overloads(["permute"], _permute))
RULES.update(_all_overloads(["transpose", "swapaxes"], _transpose))
RULES.update(_all_overloads(["t", "numpy_T"], _t))
RULES.update(_all_overloads(["cat", "concat", "concatenate"], _cat))
RULES.update(_all_overloads(["split", "split_with_sizes", "chunk", "tensor_split", "unbind",
                             "unsafe_split", "split_copy"], _split))
RULES.update(_all_overloads(["slice"], _slice))
RULES.update(_all_overloads(["select"], _select))
RULES.update(_all_overloads(["max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
                             "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                             "adaptive_avg_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices",
                             "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest1d",
                             "_adaptive_avg_pool2d", "reflection_pad2d", "replication_pad2d"], _spatial))
RULES.update(_all_overloads(["constant_pad_nd", "pad"], _pad))
RULES.update(_all_overloads(["matmul", "bmm", "mm"], _matmul))
RULES.update(_all_overloads(["addmm"], _addmm))
RULES.update(_all_overloads(["scaled_dot_product_attention"], _sdpa))
RULES.update(_all_overloads(["conv1d", "conv2d", "conv3d"], _conv_nd))
RULES.update(_all_overloads(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], _conv_transpose))
RULES.update(_all_overloads(["convolution"], _convolution))
RULES.update(_all_overloads(["linear"], _linear))
RULES.update(_all_overloads(["batch_norm"], _batch_norm))
RULES.update(_all_overloads(["layer_norm"], _layer_norm))
RULES.update(_all_overloads(["group_norm"], _group_norm))
RULES.update(_all_overloads(["embedding"], _embedding))
RULES.update(_all_overloads(["sym_size"], _sym_size))
RULES.update(_all_overloads(["_assert_scalar", "sym_constrain_range_for_size", "arange", "zeros",
                             "ones", "full", "empty", "scalar_tensor"], _ignore))
