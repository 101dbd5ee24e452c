"""quantized_decomposed ops -> ONNX QuantizeLinear / DequantizeLinear in the form ORT fuses.

ORT's QDQ selectors (onnxruntime/core/optimizer/qdq_transformer/selectors_actions) turn
``DQ(x) + DQ(w) [+ DQ(bias int32)] -> Conv/Gemm/MatMul -> Q`` into QLinearConv / QGemm /
QLinearMatMul only when the weight is an int8 *initializer* (not computed), the zero points
have the quantized tensor's type, and the bias (if quantized) is int32 with scale sx*sw.
So: int8 weights stay int8 initializers here, transposed copies for MatMul are made at
emission time (a Transpose node between DQ and MatMul would block the fusion), and a static
conv/linear bias becomes an int32 initializer.

Dynamic quantization (torchao's choose_qparams.tensor -> quantize.tensor -> dequantize.tensor
before a linear with an int8 weight) lowers to one com.microsoft DynamicQuantizeMatMul, ORT's
u8 x s8 kernel that quantizes its input row block on the fly.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)

from .emitter import Emitter, register

qd = torch.ops.quantized_decomposed
Q_TENSOR = qd.quantize_per_tensor.default
DQ_TENSOR = qd.dequantize_per_tensor.default
DQ_CHANNEL = qd.dequantize_per_channel.default
Q_CHANNEL = qd.quantize_per_channel.default
Q_DYN = qd.quantize_per_tensor.tensor
DQ_DYN = qd.dequantize_per_tensor.tensor
CHOOSE = qd.choose_qparams.tensor
QUANT_OPS = {Q_TENSOR, DQ_TENSOR, DQ_CHANNEL, Q_CHANNEL, Q_DYN, DQ_DYN, CHOOSE,
             qd.quantize_per_tensor.tensor2, qd.dequantize_per_tensor.tensor2}
__all__ = ["weight", "bias_operand", "s8_exact", "S8_EXACT_MAX", "dynamic_source", "QUANT_OPS", "DQ_TENSOR", "DQ_CHANNEL",
           "Q_TENSOR", "Q_DYN", "DQ_DYN", "CHOOSE", "dynamic_matmul"]


def _zp(em: Emitter, zp, dtype: torch.dtype, hint: str = "zp") -> str:
    if isinstance(zp, str):
        return em.add("Cast", [zp], to=_onnx(dtype))
    return em.const(torch.as_tensor(zp).to(dtype), hint)


def _scale(em: Emitter, scale, hint: str = "scale") -> str:
    if isinstance(scale, str):
        return scale
    return em.const(torch.as_tensor(scale, dtype=torch.float32), hint)


def _onnx(dtype):
    from .emitter import onnx_dtype
    return onnx_dtype(dtype)


def _const_weight_dq(em: Emitter, w) -> tuple | None:
    """(int8 tensor, scales, zero points, axis) when `w` is DQ(int8 constant), else None."""
    if not (isinstance(w, fx.Node) and w.op == "call_function" and w.target in (DQ_CHANNEL, DQ_TENSOR)):
        return None
    q = em.value(w.args[0])
    if not isinstance(q, torch.Tensor):
        return None
    scale, zp = em.value(w.args[1]), em.value(w.args[2])
    if isinstance(scale, str) or isinstance(zp, str):
        return None
    axis = w.args[3] if w.target is DQ_CHANNEL else None
    return q, torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zp), axis


def as_u8(q: torch.Tensor, zp) -> tuple[torch.Tensor, torch.Tensor]:
    """The same integers shifted to uint8: (q + 128, zp + 128) dequantize to the same values."""
    return (q.to(torch.int16) + 128).to(torch.uint8), (torch.as_tensor(zp).to(torch.int16) + 128).to(torch.uint8)


# |w| <= 64 keeps every u8 x s8 pair sum of vpmaddubsw (x86 without VNNI) within int16:
# 2 * 255 * 64 = 32640 <= 32767. Quantize(reduce_range=True) produces such weights.
S8_EXACT_MAX = 64


def s8_exact(q: torch.Tensor) -> bool:
    """Whether u8 x s8 kernels without VNNI compute with int8 weights `q` exactly (no saturation)."""
    return q.dtype != torch.int8 or q.numel() == 0 or int(q.abs().max()) <= S8_EXACT_MAX


def _weight_ints(em: Emitter, q: torch.Tensor, zp):
    """int8 weights as the emitter emits them (uint8-shifted where the CPU needs it)."""
    if q.dtype == torch.int8 and (em.int8_weights == "u8" or
                                  (em.int8_weights == "auto" and not s8_exact(q))):
        return as_u8(q, zp)
    return q, torch.as_tensor(zp).to(q.dtype)


def weight(em: Emitter, w, *, transpose: bool = False) -> str:
    """A conv/linear weight operand; int8 weights stay DQ(int8 initializer), transposed if asked."""
    found = _const_weight_dq(em, w)
    if found is not None and transpose:
        q, scale, zp, axis = found
        q, zp = _weight_ints(em, q, zp)
        axis = None if axis is None else 1 - (axis % 2)
        attrs = {} if axis is None else {"axis": axis}
        return em.add("DequantizeLinear", [em.const(q.t().contiguous(), "w_int8_t"),
                                           _scale(em, scale), em.const(zp, "zp")], **attrs)
    val = em.value(w)
    if isinstance(val, torch.Tensor):
        return em.const(val.t().contiguous() if transpose else val, "w")
    name = em.v(w)
    return em.add("Transpose", [name], perm=[1, 0]) if transpose else name


def _act_scale(x) -> float | None:
    """The literal scale of a static per-tensor DQ feeding an op, if `x` is one."""
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target is DQ_TENSOR \
            and isinstance(x.args[1], (float, int)):
        return float(x.args[1])
    return None


def bias_operand(em: Emitter, b, x, w) -> str | None:
    """Bias of a static int8 conv/gemm as DQ(int32, sx*sw) (ORT's QLinearConv/QGemm form)."""
    if b is None:
        return None
    bval, found, sx = em.value(b), _const_weight_dq(em, w), _act_scale(x)
    if not isinstance(bval, torch.Tensor) or found is None or sx is None:
        return em.v(b)
    _, sw, _, _ = found
    scale = (sx * sw.reshape(-1)).to(torch.float32)
    if scale.numel() == 1:
        scale = scale.expand(bval.numel()).contiguous()
    if not bool((scale > 0).all()):
        return em.v(b)
    q = torch.round(bval.float() / scale).clamp(-(2 ** 31), 2 ** 31 - 1).to(torch.int32)
    return em.add("DequantizeLinear", [em.const(q, "bias_int32"), em.const(scale, "bias_scale"),
                                       em.const(torch.zeros_like(q), "bias_zp")], axis=0)


# ---------------------------------------------------------------- static Q / DQ
@register(Q_TENSOR, Q_CHANNEL, fold=False)
def _quantize(em: Emitter, node: fx.Node):
    x = em.value(node.args[0])
    if isinstance(x, torch.Tensor):  # a weight quantized in the graph (fold_quantize=False)
        args = torch.fx.node.map_arg(node.args, em.value)
        return node.target(*args)
    dtype = node.args[-1]
    src = node.args[0]
    zp, qmin = em.value(node.args[2]), node.args[3]
    if node.target is Q_TENSOR and _is_relu(src) and isinstance(zp, int) and zp == qmin:
        # relu -> Q with zero point at the bottom of the range: Q clamps at 0 already. Dropping
        # the relu leaves `op -> Q`, the form ORT fuses (QLinearConv / QLinearAdd ...).
        x = em.v(src.args[0])
    if node.target is Q_CHANNEL:
        _, _, scale, zp, axis = node.args[:5]
        return em.add("QuantizeLinear", [x, _scale(em, em.value(scale)),
                                         _zp(em, em.value(zp), dtype)], axis=int(axis))
    return em.add("QuantizeLinear", [x, _scale(em, em.value(node.args[1])),
                                     _zp(em, em.value(node.args[2]), dtype)])


def _is_relu(n) -> bool:
    return isinstance(n, fx.Node) and n.target in (torch.ops.aten.relu.default,
                                                   torch.ops.aten.relu_.default)


@register(DQ_TENSOR, DQ_CHANNEL, fold=False)
def _dequantize(em: Emitter, node: fx.Node):
    dtype = node.args[6] if node.target is DQ_CHANNEL else node.args[5]
    scale, zp = em.value(node.args[1]), em.value(node.args[2])
    qval = em.value(node.args[0])
    if isinstance(qval, torch.Tensor) and not isinstance(zp, str):  # a constant (weight)
        qval, zp = _weight_ints(em, qval, zp)
        dtype = qval.dtype
        q = em.const(qval, node.args[0].name if isinstance(node.args[0], fx.Node) else "w")
    else:
        q = em.v(node.args[0])
    attrs = {"axis": int(node.args[3])} if node.target is DQ_CHANNEL else {}
    return em.add("DequantizeLinear", [q, _scale(em, scale), _zp(em, zp, dtype)], **attrs)


# ---------------------------------------------------------------- dynamic
@register(CHOOSE, fold=False)
def _choose(em: Emitter, node: fx.Node):
    y, scale, zp = em.add("DynamicQuantizeLinear", [em.v(node.args[0])], n_out=3)
    em.dynamic_q[scale] = y
    return (scale, zp)


@register(Q_DYN, fold=False)
def _quantize_dyn(em: Emitter, node: fx.Node):
    scale = em.value(node.args[1])
    if isinstance(scale, str) and scale in em.dynamic_q:  # DynamicQuantizeLinear made it (u8)
        return em.dynamic_q[scale]
    return em.add("QuantizeLinear", [em.v(node.args[0]), _scale(em, scale),
                                     _zp(em, em.value(node.args[2]), node.args[-1])])


@register(DQ_DYN, fold=False)
def _dequantize_dyn(em: Emitter, node: fx.Node):
    scale, zp = em.value(node.args[1]), em.value(node.args[2])
    q = em.v(node.args[0])
    if isinstance(zp, str):  # DynamicQuantizeLinear's zero point is already uint8
        return em.add("DequantizeLinear", [q, _scale(em, scale), zp])
    return em.add("DequantizeLinear", [q, _scale(em, scale), _zp(em, zp, node.args[-1])])


def dynamic_source(x) -> fx.Node | None:
    """The fp32 tensor a torchao dynamic Q/DQ chain quantizes, when `x` is the chain's DQ."""
    if not (isinstance(x, fx.Node) and x.target is DQ_DYN):
        return None
    q = x.args[0]
    if not (isinstance(q, fx.Node) and q.target is Q_DYN):
        return None
    return q.args[0] if isinstance(q.args[0], fx.Node) else None


def dynamic_matmul(em: Emitter, x, w, b) -> str | None:
    """DynamicQuantizeMatMul(src, W^T int8, scales, zps, bias) for a dynamic int8 linear."""
    src, found = dynamic_source(x), _const_weight_dq(em, w)
    if src is None or found is None:
        return None
    q, scale, zp, axis = found
    if q.dtype not in (torch.int8, torch.uint8) or (axis is not None and axis != 0):
        return None
    n = q.shape[0]
    scale = scale.reshape(-1).expand(n).contiguous() if scale.numel() in (1, n) else None
    if scale is None:
        return None
    q, zp = _weight_ints(em, q, torch.as_tensor(zp).reshape(-1).expand(n).contiguous())
    bias = em.v(b) if b is not None else None
    return em.add("DynamicQuantizeMatMul",
                  [em.v(src), em.const(q.t().contiguous(), "w_int8_t"), em.const(scale, "w_scale"),
                   em.const(zp, "w_zp"), bias], domain="com.microsoft")

