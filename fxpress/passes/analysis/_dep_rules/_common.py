"""Shared by the rule files: copy or empty a node's ids, merge one dim's ids, build the table.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx

from .._dep_builder import Builder, shape
from .._dep_builder import tensor_args as _tensor_args

aten = torch.ops.aten


def _same(b: Builder, n: fx.Node) -> list | None:
    i = b.get(_tensor_args(n)[0])
    return list(i) if isinstance(i, list) else None


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


def _pair(a, c, size):
    a = a if a is not None else np.full(size, -1, np.int64)
    c = c if c is not None else np.full(size, -1, np.int64)
    return a, c


def _all_overloads(names: list[str], rule: Callable) -> dict:
    out = {}
    for name in names:
        pkt = getattr(aten, name, None)
        if pkt is None:
            continue
        for ov in pkt.overloads():
            out[getattr(pkt, ov)] = rule
    return out
