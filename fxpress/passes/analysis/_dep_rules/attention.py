"""Matmul / SDPA: contracted dims unite (q.k features, k.v positions); batch and head ids pass.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import torch.fx as fx

from .._dep_builder import Builder
from .._dep_builder import arg as _arg
from .._dep_builder import has_ids as _has_ids
from .._dep_builder import where as _where
from ._common import _fill, _merge_dim, _pair


_LAYOUT = {"t", "transpose", "permute", "numpy_T", "view", "reshape", "_unsafe_view", "expand",
           "unsqueeze", "contiguous", "clone"}


def _weight_behind(x) -> fx.Node | None:
    """The get_attr a matmul operand is (through layout-only ops: Falcon's ``x @ W.T``)."""
    while isinstance(x, fx.Node) and x.op == "call_function" and \
            getattr(x.target, "__name__", "").split(".")[0] in _LAYOUT:
        x = x.args[0]
    return x if isinstance(x, fx.Node) and x.op == "get_attr" else None


def _weight_roles(b: Builder, operand, contracted, kept) -> None:
    """A weight operand of a matmul is a layer: its kept dim is "out", its contracted dim "in"."""
    w = _weight_behind(operand)
    ids = b.param_ids.get(w) if w is not None else None
    if not ids:
        return
    for d, arr in enumerate(ids):
        if arr is None:
            continue
        if kept is not None and arr.shape == kept.shape and (arr == kept).all():
            b.roles[(w.target, d)] = "out"
        elif contracted is not None and arr.shape == contracted.shape and (arr == contracted).all():
            b.roles[(w.target, d)] = "in"


def _matmul(b: Builder, n: fx.Node):
    return _matmul_of(b, n, n.args[0], n.args[1])


def _baddbmm(b: Builder, n: fx.Node):
    """input + A @ B (BLOOM's alibi scores): the product's ids, broadcast-merged with input's."""
    out = _matmul_of(b, n, n.args[1], n.args[2])
    inp = n.args[0]
    ii, si = b.get(inp), b.shape(inp)
    if out is None or ii is None or si is None:
        return out
    where = _where(n)
    for d in range(len(out)):
        k = d - (len(out) - len(si))
        if k < 0 or si[k] == 1:
            continue
        out[d] = _merge_dim(b, n, [out[d], ii[k]], (out[d] is None) != (ii[k] is None), where)
    return out


def _matmul_of(b: Builder, n: fx.Node, A, B):
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
    _weight_roles(b, B, ib[-2], ib[-1])
    _weight_roles(b, A, ia[-1], ia[-2])
    if _has_ids(ia) and _has_ids(ib):
        b.event(n, "matmul", [o for o in out if o is not None])
    return out


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
