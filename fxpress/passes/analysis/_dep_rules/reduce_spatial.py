"""Reductions keep the kept dims' ids; pooling/upsampling/padding block channels in spatial dims.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import torch.fx as fx

from .._dep_builder import Builder, Multi
from .._dep_builder import arg as _arg
from .._dep_builder import where as _where


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
