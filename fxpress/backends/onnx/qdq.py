"""The `quantized_decomposed` ops torchlib lacks, translated for torch.onnx's exporter.

torchlib translates the static ops itself (``quantize_per_tensor`` -> QuantizeLinear,
``dequantize_per_channel`` -> DequantizeLinear with ``axis``, int8 weights kept as int8
initializers). It has no function for the dynamic form (``choose_qparams.tensor``, and the
``.tensor`` Q/DQ whose zero point is a graph value), so `TRANSLATIONS` adds those:

    torch.onnx.export(ep, dynamo=True, custom_translation_table=TRANSLATIONS)

An asymmetric uint8 ``choose_qparams`` over [0, 255] is exactly ONNX's DynamicQuantizeLinear
(range widened to hold 0, scale = range / 255, rounded zero point), which ORT then fuses with
the DQ -> MatMul behind it into DynamicQuantizeMatMul (see fuse.py). Other ranges and the
symmetric form are written out with ReduceMin/ReduceMax.
"""
from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)
from onnxscript import ir
from onnxscript import opset20 as op

qd = torch.ops.quantized_decomposed
Q_TENSOR = qd.quantize_per_tensor.default
DQ_TENSOR = qd.dequantize_per_tensor.default
DQ_CHANNEL = qd.dequantize_per_channel.default
Q_CHANNEL = qd.quantize_per_channel.default
Q_DYN = qd.quantize_per_tensor.tensor
DQ_DYN = qd.dequantize_per_tensor.tensor
CHOOSE = qd.choose_qparams.tensor
CHOOSE_SYM = qd.choose_qparams_symmetric.tensor
QUANT_OPS = {Q_TENSOR, DQ_TENSOR, DQ_CHANNEL, Q_CHANNEL, Q_DYN, DQ_DYN, CHOOSE, CHOOSE_SYM,
             qd.quantize_per_tensor.tensor2, qd.dequantize_per_tensor.tensor2}
# |w| <= 64 keeps every u8 x s8 pair sum of vpmaddubsw (x86 without VNNI) within int16:
# 2 * 255 * 64 = 32640 <= 32767. Quantize(reduce_range=True) produces such weights.
S8_EXACT_MAX = 64
_ONNX_INT = {"UINT8": 2, "INT8": 3, "INT16": 5, "INT32": 6}

__all__ = ["TRANSLATIONS", "QUANT_OPS", "Q_TENSOR", "DQ_TENSOR", "DQ_CHANNEL", "Q_CHANNEL",
           "Q_DYN", "DQ_DYN", "CHOOSE", "CHOOSE_SYM", "S8_EXACT_MAX", "s8_exact"]


def s8_exact(q: torch.Tensor) -> bool:
    """Whether u8 x s8 kernels without VNNI compute with int8 weights `q` exactly (no saturation)."""
    return q.dtype != torch.int8 or q.numel() == 0 or int(q.abs().max()) <= S8_EXACT_MAX


def _onnx_int(dtype) -> int:
    # the exporter hands dtypes over as onnx_ir DataType members (str() "UINT8" ...) or ints
    name = getattr(dtype, "name", str(dtype)).upper().replace("TORCH.", "")
    return _ONNX_INT.get(name, dtype if isinstance(dtype, int) else 2)


def _range(x, qmin: int, qmax: int):
    lo = op.Min(op.ReduceMin(x, keepdims=0), op.Constant(value_float=0.0))
    hi = op.Max(op.ReduceMax(x, keepdims=0), op.Constant(value_float=0.0))
    return lo, hi


def _typed(scale, zp, to: int):
    """(scale, zp) typed as computed (float32, the `to` integer type) before the exporter
    types them from torch.

    torch's choose_qparams.tensor declares a float64 scale and an int64 zero point; the
    exporter stamps the fx node's dtype on every output a translation left untyped (and keeps
    one already set), so the graph would say tensor(double) where DynamicQuantizeLinear and
    QuantizeLinear's y_scale hold float32, and ORT refuses it (zoo cell opt-dynamic)."""
    for v, dtype in ((scale, ir.DataType.FLOAT), (zp, ir.DataType(to))):
        if getattr(v, "dtype", False) is None:  # an onnx_ir Value the exporter will type
            v.dtype = dtype
    return scale, zp


def choose_qparams(x, qmin: int, qmax: int, eps: float, dtype):
    """(scale, zero point) of torch's asymmetric choose_qparams.tensor."""
    to = _onnx_int(dtype)
    if to == 2 and (qmin, qmax) == (0, 255):
        _, scale, zp = op.DynamicQuantizeLinear(x)
        return _typed(scale, zp, to)
    lo, hi = _range(x, qmin, qmax)
    scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(qmax - qmin))),
                   op.Constant(value_float=float(eps)))
    zp = op.Sub(op.Constant(value_float=float(qmin)), op.Round(op.Div(lo, scale)))
    zp = op.Clip(zp, op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
    return _typed(scale, op.Cast(zp, to=to), to)


def choose_qparams_symmetric(x, qmin: int, qmax: int, eps: float, dtype):
    """(scale, zero point) of torch's choose_qparams_symmetric.tensor."""
    to = _onnx_int(dtype)
    lo, hi = _range(x, qmin, qmax)
    amax = op.Max(op.Neg(lo), hi)
    scale = op.Max(op.Div(amax, op.Constant(value_float=float(qmax - qmin) / 2)),
                   op.Constant(value_float=float(eps)))
    zp = op.Constant(value_int=0 if to != 2 else 128)
    return _typed(scale, op.Cast(zp, to=to), to)


def quantize_tensor(x, scale, zero_point, qmin: int, qmax: int, dtype):
    return op.QuantizeLinear(x, scale, op.Cast(zero_point, to=_onnx_int(dtype)))


def dequantize_tensor(x, scale, zero_point, qmin: int, qmax: int, dtype, out_dtype=None):
    return op.DequantizeLinear(x, scale, op.Cast(zero_point, to=_onnx_int(dtype)))


TRANSLATIONS = {CHOOSE: choose_qparams, CHOOSE_SYM: choose_qparams_symmetric,
                Q_DYN: quantize_tensor, DQ_DYN: dequantize_tensor}
