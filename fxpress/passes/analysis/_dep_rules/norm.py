"""Norm ops: the input's ids pass through and unite with per-channel weight, bias, running stats.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx

from .._dep_builder import Builder
from .._dep_builder import arg as _arg
from .._dep_builder import where as _where


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


def _weight_norm(b: Builder, n: fx.Node):
    """w = g * v / |v| (norms over every dim but `dim`): `dim` keeps its ids (v, g and w share
    them); removing an index of any other dim would change every norm, so those stay whole."""
    v, g = b.get(n.args[0]), b.get(n.args[1])
    dim = _arg(n, 2, "dim", 0) % len(v)
    where = _where(n)
    out = [None] * len(v)
    for d, ids in enumerate(v):
        if d == dim:
            gd = g[d] if g and len(g) == len(v) else None
            if ids is not None and gd is not None:
                b.union(ids, gd, where)
            out[d] = ids
        else:
            b.block(ids, f"weight_norm normalizes over this dim at {where}")
    return out
