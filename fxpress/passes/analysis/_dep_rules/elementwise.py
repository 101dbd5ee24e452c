"""Elementwise / unary ops: ids pass dim by dim through broadcasting; inputs' channels unite.

See ``__init__`` for the id lists (`info`) these rules read and write.
"""
from __future__ import annotations

import torch.fx as fx

from .._dep_builder import Builder
from .._dep_builder import has_ids as _has_ids
from .._dep_builder import tensor_args as _tensor_args
from .._dep_builder import where as _where
from ._common import _merge_dim, _same


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


def _unary(b, n):
    if "cumsum" in str(n.target) or "softmax" in str(n.target):
        return _same(b, n)  # normalizing over channels keeps shapes; values change as pruning does
    return _elementwise(b, n) if len(_tensor_args(n)) > 1 else _same(b, n)
