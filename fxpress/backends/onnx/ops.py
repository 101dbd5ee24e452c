"""Translation table for fp32 aten ops (training IR) -> ONNX nodes.

Each handler reads its fx node's arguments through the emitter (`em.v` for tensors,
`em.value` for literals, `em.val` for recorded shapes) and returns ONNX output name(s).
Weights of conv/linear go through `qdq.weight` so an int8 weight stays an int8 initializer.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...errors import UnsupportedOpError
from .emitter import Emitter, onnx_dtype, register
from .qdq import bias_operand, dynamic_matmul, weight

aten = torch.ops.aten
__all__: list[str] = []


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _rank(em: Emitter, a) -> int:
    return em.val(a).dim()


def _scalar(em: Emitter, like, value) -> str:
    """A scalar constant with the dtype of tensor `like` (ONNX does not promote)."""
    dt = em.val(like).dtype if isinstance(like, fx.Node) and em.val(like) is not None else torch.float32
    return em.const(torch.tensor(value, dtype=dt), "s")


def _operand(em: Emitter, a, like) -> str:
    return em.v(a) if isinstance(a, (fx.Node, torch.Tensor)) else _scalar(em, like, a)


def _unsupported(node, why: str):
    raise UnsupportedOpError(f"{node.target} ({why})", node, where="ONNX emitter")


# ---------------------------------------------------------------- conv / linear / matmul
@register(aten.conv2d.default, aten.conv1d.default, aten.convolution.default)
def _conv(em: Emitter, node: fx.Node):
    a = list(node.args)
    if node.target is aten.convolution.default:
        x, w, b, stride, padding, dilation, transposed, _, groups = a[:9]
        if transposed:
            _unsupported(node, "transposed convolution")
    else:
        x, w = a[0], a[1]
        b = _arg(node, 2, "bias")
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
        dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
    nd = _rank(em, x) - 2
    if isinstance(padding, str):
        _unsupported(node, f"padding={padding!r}")
    as_list = (lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * nd)
    padding = as_list(padding) * (2 if len(as_list(padding)) == nd else 1)
    inputs = [em.v(x), weight(em, w), bias_operand(em, b, x, w)]
    return em.add("Conv", inputs, strides=as_list(stride), pads=padding,
                  dilations=as_list(dilation), group=int(groups))


@register(aten.linear.default)
def _linear(em: Emitter, node: fx.Node):
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    fused = dynamic_matmul(em, x, w, b)
    if fused is not None:
        return fused
    if _rank(em, x) == 2:  # Gemm: ORT's QDQ selector fuses it (QGemm) with an int32 bias
        return em.add("Gemm", [em.v(x), weight(em, w), bias_operand(em, b, x, w)], transB=1)
    y = em.add("MatMul", [em.v(x), weight(em, w, transpose=True)])
    return em.add("Add", [y, em.v(b)]) if b is not None else y


@register(aten.addmm.default)
def _addmm(em, node):
    b, x, w = node.args[:3]
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    return em.add("Gemm", [em.v(x), weight(em, w), em.v(b)], alpha=float(alpha), beta=float(beta))


@register(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(em, node):
    return em.add("MatMul", [em.v(node.args[0]), em.v(node.args[1])])


# ---------------------------------------------------------------- normalisation
@register(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def _bn(em, node):
    x, w, b, mean, var = node.args[:5]
    if node.target is aten.batch_norm.default:
        training, eps = node.args[5], node.args[7]
        if training:
            _unsupported(node, "training-mode batch norm")
    else:
        eps = node.args[6]
    c = em.val(x).shape[1]
    w = w if w is not None else torch.ones(c)
    b = b if b is not None else torch.zeros(c)
    y = em.add("BatchNormalization", [em.v(x), em.v(w), em.v(b), em.v(mean), em.v(var)],
               epsilon=float(eps))
    if node.target is aten.batch_norm.default:
        return y
    return (y, None, None)


@register(aten.layer_norm.default)
def _layer_norm(em, node):
    x, shape = node.args[0], node.args[1]
    w, b = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    eps = _arg(node, 4, "eps", 1e-5)
    shape = list(shape)
    w = w if w is not None else torch.ones(shape)
    b = b if b is not None else torch.zeros(shape)
    return em.add("LayerNormalization", [em.v(x), em.v(w), em.v(b)], axis=-len(shape),
                  epsilon=float(eps))


# ---------------------------------------------------------------- activations
def _unary(op_type):
    def fn(em, node):
        return em.add(op_type, [em.v(node.args[0])])
    return fn


for _op, _onnx in [(aten.relu.default, "Relu"), (aten.relu_.default, "Relu"),
                   (aten.sigmoid.default, "Sigmoid"), (aten.tanh.default, "Tanh"),
                   (aten.exp.default, "Exp"), (aten.sqrt.default, "Sqrt"), (aten.neg.default, "Neg"),
                   (aten.abs.default, "Abs"), (aten.erf.default, "Erf"), (aten.log.default, "Log"),
                   (aten.reciprocal.default, "Reciprocal"), (aten.logical_not.default, "Not")]:
    register(_op)(_unary(_onnx))


@register(aten.rsqrt.default)
def _rsqrt(em, node):
    return em.add("Reciprocal", [em.add("Sqrt", [em.v(node.args[0])])])


@register(aten.gelu.default, aten.gelu_.default)
def _gelu(em, node):
    approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    return em.add("Gelu", [em.v(node.args[0])], approximate=str(approx))


@register(aten.silu.default, aten.silu_.default)
def _silu(em, node):
    x = em.v(node.args[0])
    return em.add("Mul", [x, em.add("Sigmoid", [x])])


@register(aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default)
def _clip(em, node):
    x = node.args[0]
    lo = _arg(node, 1, "min_val" if "hardtanh" in str(node.target) else "min",
              -1.0 if "hardtanh" in str(node.target) else None)
    hi = _arg(node, 2, "max_val" if "hardtanh" in str(node.target) else "max",
              1.0 if "hardtanh" in str(node.target) else None)
    return em.add("Clip", [em.v(x), None if lo is None else _scalar(em, x, lo),
                           None if hi is None else _scalar(em, x, hi)])


@register(aten.clamp_min.default)
def _clamp_min(em, node):
    return em.add("Max", [em.v(node.args[0]), _operand(em, node.args[1], node.args[0])])


@register(aten.clamp_max.default)
def _clamp_max(em, node):
    return em.add("Min", [em.v(node.args[0]), _operand(em, node.args[1], node.args[0])])


@register(aten.hardswish.default, aten.hardswish_.default)
def _hardswish(em, node):
    return em.add("HardSwish", [em.v(node.args[0])])


@register(aten.softmax.int, aten._softmax.default)
def _softmax(em, node):
    return em.add("Softmax", [em.v(node.args[0])], axis=int(node.args[1]))


@register(aten.log_softmax.int, aten._log_softmax.default)
def _log_softmax(em, node):
    return em.add("LogSoftmax", [em.v(node.args[0])], axis=int(node.args[1]))


# ---------------------------------------------------------------- elementwise binary
def _binary(op_type):
    def fn(em, node):
        a, b = node.args[0], node.args[1]
        like = a if isinstance(a, fx.Node) else b
        alpha = node.kwargs.get("alpha", 1)
        bv = _operand(em, b, like)
        if alpha != 1:
            bv = em.add("Mul", [bv, _scalar(em, like, alpha)])
        return em.add(op_type, [_operand(em, a, like), bv])
    return fn


for _op, _onnx in [(aten.add.Tensor, "Add"), (aten.add_.Tensor, "Add"), (aten.sub.Tensor, "Sub"),
                   (aten.mul.Tensor, "Mul"), (aten.mul_.Tensor, "Mul"), (aten.div.Tensor, "Div"),
                   (aten.pow.Tensor_Scalar, "Pow"), (aten.pow.Tensor_Tensor, "Pow"),
                   (aten.eq.Scalar, "Equal"), (aten.eq.Tensor, "Equal"),
                   (aten.gt.Scalar, "Greater"), (aten.gt.Tensor, "Greater"),
                   (aten.lt.Scalar, "Less"), (aten.lt.Tensor, "Less"),
                   (aten.ge.Scalar, "GreaterOrEqual"), (aten.ge.Tensor, "GreaterOrEqual"),
                   (aten.le.Scalar, "LessOrEqual"), (aten.le.Tensor, "LessOrEqual"),
                   (aten.__and__.Tensor, "And"), (aten.logical_and.default, "And"),
                   (aten.bitwise_and.Tensor, "And"), (aten.maximum.default, "Max"),
                   (aten.minimum.default, "Min")]:
    register(_op)(_binary(_onnx))


@register(aten.add.Scalar, aten.mul.Scalar, aten.sub.Scalar, aten.div.Scalar)
def _scalar_op(em, node):
    op = {"add": "Add", "mul": "Mul", "sub": "Sub", "div": "Div"}[str(node.target).split(".")[1]]
    return em.add(op, [em.v(node.args[0]), _scalar(em, node.args[0], node.args[1])])


@register(aten.rsub.Scalar)
def _rsub(em, node):
    return em.add("Sub", [_scalar(em, node.args[0], node.args[1]), em.v(node.args[0])])


@register(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(em, node):
    c, a, b = node.args[:3]
    like = a if isinstance(a, fx.Node) else (b if isinstance(b, fx.Node) else None)
    dt = em.val(node).dtype
    va = em.v(a) if isinstance(a, fx.Node) else em.const(torch.tensor(a, dtype=dt), "s")
    vb = em.v(b) if isinstance(b, fx.Node) else em.const(torch.tensor(b, dtype=dt), "s")
    del like
    return em.add("Where", [em.v(c), va, vb])


@register(aten.masked_fill.Scalar)
def _masked_fill(em, node):
    x, mask, value = node.args[:3]
    return em.add("Where", [em.v(mask), _scalar(em, x, value), em.v(x)])


# ---------------------------------------------------------------- reductions / pooling
def _reduce(op_type):
    def fn(em, node):
        x = node.args[0]
        dims = _arg(node, 1, "dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        if dims is None:
            return em.add(op_type, [em.v(x)], keepdims=int(keep))
        dims = [dims] if isinstance(dims, int) else list(dims)
        return em.add(op_type, [em.v(x), em.ints(dims, "axes")], keepdims=int(keep))
    return fn


register(aten.mean.dim)(_reduce("ReduceMean"))
register(aten.sum.dim_IntList)(_reduce("ReduceSum"))
register(aten.amax.default)(_reduce("ReduceMax"))


@register(aten.linalg_vector_norm.default)
def _norm(em, node):
    x = node.args[0]
    ord_ = _arg(node, 1, "ord", 2)
    if ord_ != 2:
        _unsupported(node, f"ord={ord_}")
    dims = _arg(node, 2, "dim")
    keep = bool(_arg(node, 3, "keepdim", False))
    axes = [em.ints([dims] if isinstance(dims, int) else list(dims), "axes")] if dims is not None else []
    return em.add("ReduceL2", [em.v(x), *axes], keepdims=int(keep))


@register(aten.max_pool2d.default)
def _max_pool(em, node):
    x, k = node.args[0], list(node.args[1])
    stride = list(_arg(node, 2, "stride", []) or k)
    pad = _arg(node, 3, "padding", 0)
    dil = _arg(node, 4, "dilation", 1)
    ceil = bool(_arg(node, 5, "ceil_mode", False))
    pad = [pad, pad] if isinstance(pad, int) else list(pad)
    dil = [dil, dil] if isinstance(dil, int) else list(dil)
    stride = [stride[0]] * 2 if len(stride) == 1 else stride
    k = k * 2 if len(k) == 1 else k
    return em.add("MaxPool", [em.v(x)], kernel_shape=k, strides=stride, pads=pad * 2,
                  dilations=dil, ceil_mode=int(ceil))


@register(aten.avg_pool2d.default)
def _avg_pool(em, node):
    x, k = node.args[0], list(node.args[1])
    stride = list(_arg(node, 2, "stride", []) or k)
    pad = _arg(node, 3, "padding", 0)
    pad = [pad, pad] if isinstance(pad, int) else list(pad)
    ceil = bool(_arg(node, 4, "ceil_mode", False))
    include = bool(_arg(node, 5, "count_include_pad", True))
    if _arg(node, 6, "divisor_override") is not None:
        _unsupported(node, "divisor_override")
    k = k * 2 if len(k) == 1 else k
    stride = [stride[0]] * 2 if len(stride) == 1 else stride
    return em.add("AveragePool", [em.v(x)], kernel_shape=k, strides=stride, pads=pad * 2,
                  ceil_mode=int(ceil), count_include_pad=int(include))


@register(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool(em, node):
    x, out = node.args[0], list(node.args[1])
    h, w = em.val(x).shape[-2:]
    if out == [1, 1]:
        return em.add("GlobalAveragePool", [em.v(x)])
    if h % out[0] or w % out[1]:
        _unsupported(node, f"input {h}x{w} not a multiple of output {out}")
    k = [h // out[0], w // out[1]]
    return em.add("AveragePool", [em.v(x)], kernel_shape=k, strides=k)


# ---------------------------------------------------------------- shape and data movement
@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _reshape(em, node):
    return em.add("Reshape", [em.v(node.args[0]), em.ints(list(em.val(node).shape))])


@register(aten.flatten.using_ints)
def _flatten(em, node):
    return em.add("Reshape", [em.v(node.args[0]), em.ints(list(em.val(node).shape))])


@register(aten.expand.default, aten.expand_as.default)
def _expand(em, node):
    return em.add("Expand", [em.v(node.args[0]), em.ints(list(em.val(node).shape))])


@register(aten.permute.default)
def _permute(em, node):
    r = _rank(em, node.args[0])
    return em.add("Transpose", [em.v(node.args[0])], perm=[d % r for d in node.args[1]])


@register(aten.transpose.int)
def _transpose(em, node):
    r = _rank(em, node.args[0])
    perm = list(range(r))
    a, b = node.args[1] % r, node.args[2] % r
    perm[a], perm[b] = perm[b], perm[a]
    return em.add("Transpose", [em.v(node.args[0])], perm=perm)


@register(aten.t.default)
def _t(em, node):
    return em.add("Transpose", [em.v(node.args[0])], perm=[1, 0])


@register(aten.unsqueeze.default)
def _unsqueeze(em, node):
    r = _rank(em, node.args[0]) + 1
    return em.add("Unsqueeze", [em.v(node.args[0]), em.ints([node.args[1] % r], "axes")])


@register(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(em, node):
    r = _rank(em, node.args[0])
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    shape = em.val(node.args[0]).shape
    dims = [d % r for d in dims if shape[d % r] == 1]
    if not dims:
        return em.v(node.args[0])
    return em.add("Squeeze", [em.v(node.args[0]), em.ints(dims, "axes")])


@register(aten.slice.Tensor)
def _slice(em, node):
    x = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    size = em.val(x).shape[dim]
    start = 0 if start is None else max(min(start, size), -size)
    end = size if end is None else max(min(end, size), -size)
    if start == 0 and end == size and step == 1:
        return em.v(x)
    return em.add("Slice", [em.v(x), em.ints([start], "starts"), em.ints([end], "ends"),
                            em.ints([dim], "axes"), em.ints([step], "steps")])


@register(aten.select.int)
def _select(em, node):
    x, dim, idx = node.args[:3]
    return em.add("Gather", [em.v(x), em.const(np.asarray(idx, dtype=np.int64), "idx")], axis=int(dim))


@register(aten.cat.default)
def _cat(em, node):
    tensors = [t for t in node.args[0] if em.val(t) is None or em.val(t).numel() > 0]
    dim = _arg(node, 1, "dim", 0)
    r = _rank(em, tensors[0])
    return em.add("Concat", [em.v(t) for t in tensors], axis=int(dim) % r)


@register(aten.embedding.default)
def _embedding(em, node):
    w, idx = node.args[0], node.args[1]
    return em.add("Gather", [em.v(w), em.v(idx)], axis=0)


@register(aten.gather.default)
def _gather(em, node):
    x, dim, idx = node.args[:3]
    return em.add("GatherElements", [em.v(x), em.v(idx)], axis=int(dim))


@register(aten.index.Tensor)
def _index(em, node):
    """x[i0, i1, ...] with constant index tensors: one GatherND over their broadcast stack."""
    x, indices = node.args[0], node.args[1]
    vals = [em.value(i) if i is not None else None for i in indices]
    if any(v is None or isinstance(v, str) for v in vals):
        _unsupported(node, "index tensors computed at run time or with None entries")
    b = torch.broadcast_tensors(*[v.long() for v in vals])
    idx = torch.stack(b, dim=-1)
    return em.add("GatherND", [em.v(x), em.const(idx, "index")])


# ---------------------------------------------------------------- no-ops and casts
@register(aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.lift_fresh_copy.default)
def _identity(em, node):
    return em.v(node.args[0])


@register(aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default)
def _dropout(em, node):
    if _arg(node, 2, "train", False):
        _unsupported(node, "dropout in training mode")
    return em.v(node.args[0])


@register(aten._assert_tensor_metadata.default)
def _assert(em, node):
    return None


@register(aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
          aten.type_as.default)
def _to(em, node):
    src, dst = em.val(node.args[0]), em.val(node)
    if src is not None and dst is not None and src.dtype == dst.dtype:
        return em.v(node.args[0])
    return em.add("Cast", [em.v(node.args[0])], to=onnx_dtype(dst.dtype))
