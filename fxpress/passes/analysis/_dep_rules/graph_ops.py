"""Graph plumbing: getitem picks one output's ids, size reads block a dim, factories carry none.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import torch.fx as fx

from .._dep_builder import Builder, Multi
from .._dep_builder import has_ids as _has_ids
from .._dep_builder import where as _where
from ._common import _fill


def _getitem(b: Builder, n: fx.Node):
    src = b.info.get(n.args[0])
    if isinstance(src, Multi):
        return src[n.args[1]]
    if _has_ids(src):
        b._unknown(n, "getitem of a single tensor")
    return _fill(n)


def _sym_size(b: Builder, n: fx.Node):
    x = b.get(n.args[0])
    if x and x[n.args[1]] is not None:
        b.block(x[n.args[1]], f"size read at {_where(n)}")
    return None


def _ignore(b, n):
    return None
