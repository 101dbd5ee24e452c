"""FloatOutputs: the model's own outputs leave the int8 graph unrounded.

A quantize -> dequantize pair whose result is only a graph output rounds the final answer to
256 levels and feeds nothing int8: on a 1000-class classifier a logit step of ~0.1 flips the
top-1 of close calls (real EfficientNet-Lite0: 25.5 dB at the classifier, 18 dB after its
output Q/DQ; top-1 agreement with fp32 90.6 % -> see docs/CONTRACTS.md). torchao's x86
quantizer leaves the last linear's output float the same way. Runs after ConvertToQDQ; the
int8 kernel then writes float (Inductor's qlinear/qconv with fp32 output; ORT's QGemm /
MatMulIntegerToFloat, or a float Gemm on int8 weights).

    fxpress.Quantize(mode="static", float_outputs=True)   # opt-in (default False)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401
import torch.fx as fx

from ..base import Pass, PassContext, PassResult

__all__ = ["FloatOutputs"]

qd = torch.ops.quantized_decomposed


def _output_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    pairs = []
    for dq in out.all_input_nodes:
        if dq.target is not qd.dequantize_per_tensor.default or set(dq.users) != {out}:
            continue
        q = dq.args[0]
        if isinstance(q, fx.Node) and q.target is qd.quantize_per_tensor.default \
                and len(q.users) == 1 and isinstance(q.args[0], fx.Node):
            pairs.append((q, dq))
    return pairs


@dataclass(frozen=True)
class FloatOutputs(Pass):
    """Drop the activation quantize -> dequantize pairs that only feed the graph's outputs."""

    name: ClassVar[str] = "quant_float_outputs"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        pairs = _output_pairs(gm)
        for q, dq in pairs:
            dq.replace_all_uses_with(q.args[0])
            gm.graph.erase_node(dq)
            gm.graph.erase_node(q)
        if pairs:
            gm.recompile()
        return PassResult(gm, bool(pairs), {"float_outputs": len(pairs)})
