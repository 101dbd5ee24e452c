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
