"""LatencyCheck: keep a conv/linear float where its int8 form runs slower on the target backend.

Runs after AnnotateQuant, before observers exist. For every annotated conv2d / linear with a
constant weight, two one-layer graphs of the layer's real shapes are timed through the
latency service (fxpress/latency.py), lowered with the real backend:

- float: ``op(x, w, b)``;
- int8: ``dq(q(x)) -> op(., dq(w_int8 per-channel), b) -> q -> dq``, the form the quantized IR
  gives the backend (Inductor: one qconv/qlinear kernel with its requantization).

Where int8 is slower the layer loses its QuantAnnotation (its weight and input stay float).
The int8 unit pays for quantizing its input, which a chain of int8 layers shares, so the
check leans towards float: it keeps int8 only where it pays on its own. The report section
``quant_latency`` lists per layer the two timings and what was kept; the layer's node gets a
``LayerChoice`` record.

    Quantize(mode="static", latency_check="auto", latency_backend="inductor")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import LayerChoice, QuantAnnotation, drop_record, get_record, module_path, set_record
from ..base import Pass, PassContext, PassResult
from ...latency import concrete_shape
from .convert import fetch_attr

__all__ = ["LatencyCheck", "layer_builders"]

aten = torch.ops.aten
_OPS = {aten.conv2d.default: "conv", aten.linear.default: "linear"}


def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return concrete_shape(v.shape) if isinstance(v, torch.Tensor) else None


def _one_layer(op, x_shape, w: torch.Tensor, b, rest: tuple, int8: bool,
               dynamic: bool = False) -> fx.GraphModule:
    """A GraphModule computing one layer (float, or in the quantized IR's Q/DQ form)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    qd = torch.ops.quantized_decomposed
    root = torch.nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(x_shape)
    if int8:
        amax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-8)
        scale = (amax / 127).float()
        root.register_buffer("w_int8", qd.quantize_per_channel(
            w.detach(), scale, torch.zeros_like(scale, dtype=torch.int64), 0, -127, 127, torch.int8))
        root.register_buffer("w_scale", scale)
        root.register_buffer("w_zero_point", torch.zeros_like(scale, dtype=torch.int64))
        if dynamic:  # torchao's dynamic form: qparams chosen at run time, output float
            import operator
            cq = g.call_function(qd.choose_qparams.tensor,
                                 (x, 0, 255, torch.finfo(torch.float32).eps, torch.uint8))
            s, z = (g.call_function(operator.getitem, (cq, i)) for i in (0, 1))
            xq = g.call_function(qd.dequantize_per_tensor.tensor, (g.call_function(
                qd.quantize_per_tensor.tensor, (x, s, z, 0, 255, torch.uint8)), s, z, 0, 255,
                torch.uint8))
        else:
            act = (0.05, 128, 0, 255, torch.uint8)
            xq = g.call_function(qd.dequantize_per_tensor.default, (g.call_function(
                qd.quantize_per_tensor.default, (x,) + act),) + act)
        wq = g.call_function(qd.dequantize_per_channel.default,
                             (g.get_attr("w_int8"), g.get_attr("w_scale"), g.get_attr("w_zero_point"),
                              0, -127, 127, torch.int8))
    else:
        root.register_buffer("w", w.detach().clone())
        xq, wq = x, g.get_attr("w")
    bn = None
    if isinstance(b, torch.Tensor):
        root.register_buffer("b", b.detach().clone())
        bn = g.get_attr("b")
    y = g.call_function(op, (xq, wq, bn) + tuple(rest))
    if int8 and not dynamic:
        out = (0.05, 128, 0, 255, torch.uint8)
        y = g.call_function(qd.dequantize_per_tensor.default,
                            (g.call_function(qd.quantize_per_tensor.default, (y,) + out),) + out)
    g.output(y)
    return fx.GraphModule(root, g)


def layer_builders(gm: fx.GraphModule, node: fx.Node, backend: str, *, dynamic: bool = False,
                   threads: int | None = None):
    """(signature, {"float": builder, "int8": builder}) for one conv2d/linear node, or None."""
    x_shape, w_node = _shape(node.args[0]), node.args[1]
    if x_shape is None or not isinstance(w_node, fx.Node) or w_node.op != "get_attr":
        return None
    w = fetch_attr(gm, w_node.target)
    b_node = node.args[2] if len(node.args) > 2 else None
    b = fetch_attr(gm, b_node.target) if isinstance(b_node, fx.Node) and b_node.op == "get_attr" else None
    rest = tuple(node.args[3:])
    if any(isinstance(a, fx.Node) for a in rest) or (isinstance(b_node, fx.Node) and b is None):
        return None
    sig = (x_shape, tuple(w.shape), b is not None, rest, "dynamic" if dynamic else "static")

    def build(int8: bool):
        def make():
            from ...api import lower
            x = torch.randn(x_shape)
            opts = {"threads": threads} if backend == "onnxruntime" and threads else {}
            run = lower(_one_layer(node.target, x_shape, w, b, rest, int8, dynamic), backend,
                        example_inputs=(x,), **opts)
            return run, (x,)
        return make

    return sig, {"float": build(False), "int8": build(True)}


@dataclass(frozen=True)
class LatencyCheck(Pass):
    """Time each annotated conv/linear float vs int8 on the backend; keep float where int8 is slower."""

    name: ClassVar[str] = "quant_latency_check"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    backend: str = "inductor"
    dynamic: bool = False
    service: Any = None      # a fxpress.latency.LatencyService (tests pass one with a fake timer)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from ...latency import LatencyService
        svc = self.service or LatencyService(self.backend)
        rows, floated = [], 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _OPS:
                continue
            ann = get_record(node, QuantAnnotation)
            if ann is None or not ann.inputs:
                continue
            found = layer_builders(gm, node, svc.backend, dynamic=self.dynamic)
            if found is None:
                continue
            sig, builders = found
            kept, ms = svc.fastest(str(node.target), sig, "float32", builders, default="int8")
            set_record(node, LayerChoice(kept, tuple(ms), tuple(ms.values()), svc.backend))
            rows.append({"module": module_path(node), "op": _OPS[node.target], "kept": kept,
                         "float_ms": round(ms["float"], 4), "int8_ms": round(ms["int8"], 4)})
            if kept == "float":
                drop_record(node, QuantAnnotation)
                floated += 1
        ctx.report["quant_latency"] = {"backend": svc.backend, "isa": svc.isa, "layers": rows,
                                       "timed": svc.timed, "cached": svc.hits}
        return PassResult(gm, floated > 0, {"layers": len(rows), "float": floated,
                                            "timed": svc.timed, "cached": svc.hits})
