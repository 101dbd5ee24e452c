"""Channel-coupling rules for dependency analysis: a table keyed by ATen op, one file per op family.

A node's `info` is a list with one entry per dim of its value: an int64 array of
channel-element ids (-1 where an index belongs to no prunable channel) or None when
the dim carries no channels. Rules union ids (same channel) or block them (the size
of that dim may not change), and record *fixups*: shape constants (view sizes, split
sizes, conv groups, head counts) to recompute after pruning.

    RULES[torch.ops.aten.conv2d.default](builder, node)  # -> the output's per-dim ids

Families: conv_linear, norm, elementwise, shape_ops, reduce_spatial, attention, graph_ops.
Later entries below win where two lists name the same op (kept in the original order).
"""
from __future__ import annotations

import operator

from ._common import _all_overloads
from .attention import _baddbmm, _matmul, _sdpa
from .conv_linear import _addmm, _conv_nd, _conv_transpose, _convolution, _embedding, _linear
from .elementwise import _ELEMENTWISE, _UNARY, _elementwise, _unary
from .graph_ops import _getitem, _ignore, _sym_size
from .norm import _batch_norm, _group_norm, _layer_norm, _weight_norm
from .reduce_spatial import _pad, _reduce, _spatial
from .shape_ops import (
                        _cat,
                        _expand,
                        _gather,
                        _index,
                        _no_const_reshape,
                        _permute,
                        _reshape_as,
                        _repeat_interleave,
                        _select,
                        _slice,
                        _split,
                        _stack,
                        _t,
                        _transpose,
                        _unflatten,
                        _view,
)

__all__ = ["RULES"]

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
                             "upsample_bicubic2d", "upsample_linear1d", "upsample_nearest3d",
                             "upsample_trilinear3d", "_upsample_nearest_exact2d",
                             "_adaptive_avg_pool2d", "reflection_pad2d", "replication_pad2d"], _spatial))
RULES.update(_all_overloads(["constant_pad_nd", "pad"], _pad))
RULES.update(_all_overloads(["matmul", "bmm", "mm"], _matmul))
RULES.update(_all_overloads(["addmm"], _addmm))
RULES.update(_all_overloads(["baddbmm"], _baddbmm))
RULES.update(_all_overloads(["stack"], _stack))
RULES.update(_all_overloads(["index"], _index))
RULES.update(_all_overloads(["gather"], _gather))
RULES.update(_all_overloads(["repeat_interleave"], _repeat_interleave))
RULES.update(_all_overloads(["reshape_as", "view_as"], _reshape_as))
RULES.update(_all_overloads(["scaled_dot_product_attention"], _sdpa))
RULES.update(_all_overloads(["conv1d", "conv2d", "conv3d"], _conv_nd))
RULES.update(_all_overloads(["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"], _conv_transpose))
RULES.update(_all_overloads(["convolution"], _convolution))
RULES.update(_all_overloads(["linear"], _linear))
RULES.update(_all_overloads(["batch_norm"], _batch_norm))
RULES.update(_all_overloads(["layer_norm"], _layer_norm))
RULES.update(_all_overloads(["group_norm"], _group_norm))
RULES.update(_all_overloads(["_weight_norm"], _weight_norm))
RULES.update(_all_overloads(["embedding"], _embedding))
RULES.update(_all_overloads(["sym_size"], _sym_size))
RULES.update(_all_overloads(["_assert_scalar", "sym_constrain_range_for_size", "arange", "zeros",
                             "ones", "full", "empty", "scalar_tensor"], _ignore))
