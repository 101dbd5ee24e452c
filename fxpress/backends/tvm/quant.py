"""Relax converters for the `quantized_decomposed` ops of the quantized IR form (docs/CONTRACTS.md).

TVM's torch importer knows no quantization. These converters translate quantize /
dequantize into Relax arithmetic with torch's exact rounding rules, and turn

    dequantize_per_tensor(q_x) , dequantize_per_channel(w_int8) -> conv2d / linear

into an integer conv2d / matmul on the 8-bit tensors accumulating in int32, followed by one
float rescale (`s_x * s_w[o]`) that FuseOps folds into the kernel's epilogue. Activation zero
points are handled the QNN way: pad with the zero point, then subtract `zp_x * sum(w[o])`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)
import torch.fx as fx
from tvm import relax

__all__ = ["QuantConverters", "QUANT_OPS"]

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten

_INT8_GROUP = 4  # reduction elements per int8 dot-product intrinsic step (intrin.GROUP)
_TVM_DTYPE = {torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16", torch.int32: "int32"}


def _const(t: torch.Tensor | float, dtype: str) -> relax.Constant:
    if isinstance(t, torch.Tensor):
        return relax.const(t.detach().cpu().numpy(), dtype)
    return relax.const(t, dtype)


class QuantConverters:
    """Converters keyed by op object; `string_map()` adapts them to TVM's name-keyed table.

    `consts` maps an exported-program placeholder name to its tensor (weights, scales):
    the int8 path reads weight sums and scales at compile time. `stats` counts which
    lowering each conv/linear took (tests assert the integer path fired).
    """

    def __init__(self, importer: Any, consts: dict[str, torch.Tensor], stats: dict[str, int]):
        self.imp, self.consts, self.stats = importer, consts, stats
        self.float_conv2d = importer.convert_map["conv2d.default"]
        self.float_linear = importer.convert_map["linear.default"]
        self.table: dict[Any, Callable[[fx.Node], relax.Expr]] = {
            qd.quantize_per_tensor.default: self._quantize,
            qd.quantize_per_tensor.tensor: self._quantize,
            qd.dequantize_per_tensor.default: self._dequantize,
            qd.dequantize_per_tensor.tensor: self._dequantize,
            qd.quantize_per_channel.default: self._quantize_per_channel,
            qd.dequantize_per_channel.default: self._dequantize_per_channel,
            qd.choose_qparams.tensor: self._choose_qparams,
            aten.conv2d.default: self._conv2d,
            aten.linear.default: self._linear,
        }

    def string_map(self) -> dict[str, Callable]:
        return {op.__name__: (lambda node, _imp, fn=fn: fn(node)) for op, fn in self.table.items()}

    # ------------------------------------------------------------------ helpers
    def _emit(self, expr: relax.Expr) -> relax.Var:
        return self.imp.block_builder.emit(expr)

    def _env(self, arg):
        return self.imp.env[arg] if isinstance(arg, fx.Node) else arg

    def _scalar(self, v, dtype: str) -> relax.Expr:
        """A literal (float/int) becomes a constant; a node (dynamic qparams) its Relax value."""
        if isinstance(v, fx.Node):
            return self._emit(relax.op.astype(relax.op.reshape(self.imp.env[v], ()), dtype))
        return relax.const(v, dtype)

    def _bump(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    # ------------------------------------------------------------------ Q / DQ
    def _q(self, x, inv_scale, zp, qmin: int, qmax: int, dtype: torch.dtype) -> relax.Var:
        # torch: clamp(round(x * (1/scale)) + zp, qmin, qmax).to(dtype); round is half-to-even
        # in both (TVM lowers round to llvm.nearbyint).
        # clamp as maximum/minimum, not relax clip: ConvertLayout has no layout rule for clip
        # and would put an NCHW<->NHWC transpose pair around every quantize (ResNet-18 int8:
        # 12 ms of transposes, the stem's alone 9 ms, against 0.1 ms in the fp32 graph).
        y = relax.op.add(relax.op.round(relax.op.multiply(x, inv_scale)), zp)
        y = relax.op.minimum(relax.op.maximum(y, relax.const(float(qmin), "float32")),
                             relax.const(float(qmax), "float32"))
        return self._emit(relax.op.astype(y, _TVM_DTYPE[dtype]))

    def _quantize(self, node: fx.Node) -> relax.Var:
        x, scale, zp, qmin, qmax, dtype = node.args[:6]
        if isinstance(scale, fx.Node):
            inv = self._emit(relax.op.divide(relax.const(1.0, "float32"), self._scalar(scale, "float32")))
        else:
            inv = relax.const(1.0 / scale, "float32")
        return self._q(self.imp.env[x], inv, self._scalar(zp, "float32"), qmin, qmax, dtype)

    def _dequantize(self, node: fx.Node) -> relax.Var:
        x, scale, zp = node.args[:3]
        xf = relax.op.astype(self.imp.env[x], "float32")
        return self._emit(relax.op.multiply(relax.op.subtract(xf, self._scalar(zp, "float32")),
                                            self._scalar(scale, "float32")))

    def _channel_shape(self, node: fx.Node, axis: int) -> tuple[int, list[int]]:
        rank = len(node.args[0].meta["val"].shape)
        axis = axis % rank
        shape = [1] * rank
        shape[axis] = -1
        return axis, shape

    def _quantize_per_channel(self, node: fx.Node) -> relax.Var:
        x, scales, zps, axis, qmin, qmax, dtype = node.args[:7]
        _, shape = self._channel_shape(node, axis)
        inv = self._emit(relax.op.divide(relax.const(1.0, "float32"),
                                         relax.op.astype(self.imp.env[scales], "float32")))
        zp = self._emit(relax.op.astype(self.imp.env[zps], "float32"))
        inv, zp = self._emit(relax.op.reshape(inv, shape)), self._emit(relax.op.reshape(zp, shape))
        return self._q(self.imp.env[x], inv, zp, qmin, qmax, dtype)

    def _dequantize_per_channel(self, node: fx.Node) -> relax.Var:
        x, scales, zps, axis = node.args[:4]
        _, shape = self._channel_shape(node, axis)
        s = self._emit(relax.op.reshape(self._emit(relax.op.astype(self.imp.env[scales], "float32")), shape))
        zp = self._emit(relax.op.reshape(self._emit(relax.op.astype(self.imp.env[zps], "float32")), shape))
        xf = relax.op.astype(self.imp.env[x], "float32")
        return self._emit(relax.op.multiply(relax.op.subtract(xf, zp), s))

    def _choose_qparams(self, node: fx.Node) -> relax.Var:
        # torch's determine_qparams (affine): range widened to include 0, scale >= eps.
        x, qmin, qmax, eps = node.args[:4]
        xv = self.imp.env[x]
        lo = relax.op.minimum(relax.op.min(xv), relax.const(0.0, "float32"))
        hi = relax.op.maximum(relax.op.max(xv), relax.const(0.0, "float32"))
        scale = self._emit(relax.op.maximum(relax.op.divide(relax.op.subtract(hi, lo),
                                                            relax.const(float(qmax - qmin), "float32")),
                                            relax.const(eps, "float32")))
        zp = relax.op.subtract(relax.const(float(qmin), "float32"),
                               relax.op.round(relax.op.divide(lo, scale)))
        zp = self._emit(relax.op.astype(relax.op.clip(zp, qmin, qmax), "int64"))
        return self._emit(relax.Tuple([self._emit(relax.op.reshape(scale, (1,))),
                                       self._emit(relax.op.reshape(zp, (1,)))]))

    # ------------------------------------------------------------------ int8 compute
    def _int_activation(self, arg) -> tuple | None:
        """(int tensor, scale, zero point) when `arg` is a static per-tensor dequantize."""
        if not (isinstance(arg, fx.Node) and arg.target is qd.dequantize_per_tensor.default):
            return None
        src, scale, zp, _, _, dtype = arg.args[:6]
        if dtype not in (torch.uint8, torch.int8) or not isinstance(scale, float) or not isinstance(zp, int):
            return None
        return self.imp.env[src], scale, zp

    def _int_weight(self, arg) -> tuple | None:
        """(weight var, int8 tensor, per-output-channel float64 scales) for a constant int8 weight."""
        if not (isinstance(arg, fx.Node) and arg.target in (qd.dequantize_per_channel.default,
                                                            qd.dequantize_per_tensor.default)
                and isinstance(arg.args[0], fx.Node)):
            return None
        w = self.consts.get(arg.args[0].name)
        if w is None or w.dtype != torch.int8:
            return None
        if arg.target is qd.dequantize_per_channel.default:
            scales, zps = (self.consts.get(getattr(a, "name", None)) for a in arg.args[1:3])
            axis = arg.args[3]
            if scales is None or zps is None or axis % w.dim() != 0 or bool(zps.ne(0).any()):
                return None
            s = scales.double()
        elif arg.target is qd.dequantize_per_tensor.default:
            if arg.args[2] != 0 or not isinstance(arg.args[1], float):
                return None
            s = torch.full((w.shape[0],), arg.args[1], dtype=torch.float64)
        else:
            return None
        return self.imp.env[arg.args[0]], w, s

    def _rescale(self, acc, zp: int, w: torch.Tensor, sx: float, sw: torch.Tensor, bias, shape):
        if zp != 0:
            corr = (w.to(torch.int64).flatten(1).sum(1) * zp).to(torch.int32).reshape(shape)
            acc = self._emit(relax.op.subtract(acc, _const(corr, "int32")))
        y = relax.op.multiply(relax.op.astype(acc, "float32"),
                              _const((sw * sx).float().reshape(shape), "float32"))
        if bias is not None:
            y = relax.op.add(y, relax.op.reshape(self.imp.env[bias], shape))
        return self._emit(y)

    def _conv2d(self, node: fx.Node) -> relax.Var:
        args = list(node.args) + [None] * (7 - len(node.args))
        x, w, bias, stride, padding, dilation, groups = args[:7]
        act, wt = self._int_activation(x), self._int_weight(w)
        if act is None or wt is None or isinstance(padding, str) or node.kwargs:
            self._bump("conv2d_float")
            return self.float_conv2d(node)
        xq, sx, zx = act
        wv, w_t, sw = wt
        stride, dilation = stride or [1, 1], dilation or [1, 1]
        ph, pw = (padding or [0, 0]) * (2 if len(padding or [0, 0]) == 1 else 1)
        # Input channels padded to a multiple of the int8 intrinsics' group (4) with zero
        # weights, so a 3-channel stem is tensorized too (4/3 the MACs at 4x the MAC rate);
        # the padded activations' value does not matter, the weights there are 0.
        pc = (-w_t.shape[1]) % _INT8_GROUP if (groups or 1) == 1 else 0
        if pc:
            wv = _const(torch.nn.functional.pad(w_t, (0, 0, 0, 0, 0, pc)), "int8")
        if pc or (zx != 0 and (ph or pw)):
            # Pad with the zero point (real 0.0), so the correction term below stays exact.
            # relax pad has no layout rule (ConvertLayout keeps it NCHW between transposes),
            # so it is emitted only where the conv's own zero padding would be wrong.
            xq = self._emit(relax.op.nn.pad(xq, [0, 0, 0, pc, ph, ph, pw, pw], "constant", float(zx)))
            ph = pw = 0
        acc = self._emit(relax.op.nn.conv2d(xq, wv, strides=stride, padding=[ph, pw], dilation=dilation,
                                            groups=groups or 1, out_dtype="int32"))
        self._bump("conv2d_int8")
        return self._rescale(acc, zx, w_t, sx, sw, bias, (1, -1, 1, 1))

    def _linear(self, node: fx.Node) -> relax.Var:
        x, w = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        act, wt = self._int_activation(x), self._int_weight(w)
        if act is None or wt is None:
            self._bump("linear_float")
            return self.float_linear(node)
        xq, sx, zx = act
        wv, w_t, sw = wt
        acc = self._emit(relax.op.matmul(xq, relax.op.permute_dims(wv, [1, 0]), out_dtype="int32"))
        self._bump("linear_int8")
        return self._rescale(acc, zx, w_t, sx, sw, bias, (-1,))


# Ops whose TVM conversion is ours alone (TVM's name-keyed table must not claim them).
QUANT_OPS = frozenset({
    qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor,
    qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor,
    qd.quantize_per_channel.default, qd.dequantize_per_channel.default,
    qd.choose_qparams.tensor,
})
