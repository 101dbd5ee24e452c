"""Shape ops: ids move with the dims they move; view/split/slice sizes are recorded as fixups.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from .._dep_builder import Builder, Multi
from .._dep_builder import arg as _arg
from .._dep_builder import where as _where
from ._common import _merge_dim

aten = torch.ops.aten


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


def _reshape_as(b: Builder, n: fx.Node):
    """reshape_as(x, other): sizes come from `other`, so its dims meet the output's (no fixup)."""
    out = _reshape(b, n, None)
    other, so = b.get(n.args[1]), b.shape(n.args[1])
    where = _where(n)
    for d in range(len(out)):
        arrs = [out[d], other[d] if other else None]
        out[d] = _merge_dim(b, n, arrs, (arrs[0] is None) != (arrs[1] is None) and so[d] > 1, where)
    return out


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


def _stack(b: Builder, n: fx.Node):
    """stack(ts, dim): every input dim meets the same dim of the others; the new dim has none."""
    ts = [t for t in n.args[0] if isinstance(t, fx.Node)]
    r = len(b.shape(n))
    dim = _arg(n, 1, "dim", 0) % r
    where = _where(n)
    out: list = []
    for d in range(r - 1):
        arrs = [b.get(t)[d] for t in ts]
        fixed = any(a is None for a in arrs) and b.shape(ts[0])[d] > 1
        out.append(_merge_dim(b, n, arrs, fixed, where))
    out.insert(dim, None)
    return out


def _index(b: Builder, n: fx.Node):
    """x[..., idx, ...] with one index tensor (rotary tables, token positions): the indexed dim
    is kept whole (which positions it picks is data); the other dims keep their ids."""
    x, idx = b.get(n.args[0]), list(n.args[1])
    where = _where(n)
    tensors = [k for k, i in enumerate(idx) if i is not None]
    if len(tensors) != 1 or x is None:
        b.block_info(x, f"advanced indexing with several index tensors at {where}")
        for i in idx:
            b.block_info(b.get(i), where)
        return [None] * len(b.shape(n))
    k = tensors[0]
    b.block(x[k], f"indexed dim at {where}")
    ii = b.get(idx[k]) or []
    b.block_info(ii, f"index values at {where}")
    return list(x[:k]) + [None] * len(b.shape(idx[k])) + list(x[k + 1:])


def _repeat_interleave(b: Builder, n: fx.Node):
    """repeat_interleave(x, r, dim) with an int r: each id of `dim` repeated r times in place."""
    x, r, dim = b.get(n.args[0]), _arg(n, 1, "repeats"), _arg(n, 2, "dim")
    if not isinstance(r, int) or dim is None or x is None:
        b.block_info(x, f"repeat_interleave without an int count and a dim at {_where(n)}")
        return [None] * len(b.shape(n))
    dim %= len(x)
    out = list(x)
    out[dim] = np.repeat(x[dim], r) if x[dim] is not None else None
    return out


def _gather(b: Builder, n: fx.Node):
    """gather(x, dim, index): which positions it reads is data, so every dim is kept whole."""
    where = _where(n)
    b.block_info(b.get(n.args[0]), f"gather reads data-chosen positions at {where}")
    b.block_info(b.get(n.args[2]), f"gather index at {where}")
    return [None] * len(b.shape(n))


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
