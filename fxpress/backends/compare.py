"""Numerics debugger: per-node SQNR of a compressed IR against the fp32 IR, plus the backend's.

    rows = compare(fp32_gm, quant_gm, (x,), lowered=run)
    print(format_compare(rows))
    # module          op       SQNR dB
    # conv1           conv2d   38.2
    # layer4.1.conv2  conv2d   21.7     <- the layer that loses the most
    # <output>        onnxruntime  24.9

Nodes are matched by (module path, op, occurrence): quantization inserts Q/DQ nodes but keeps
each compute node's lineage, so `layer1.0.conv1`'s conv in both graphs is the same tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx

from ..ir.meta import lineage
from .onnx.qdq import QUANT_OPS

__all__ = ["CompareRow", "compare", "format_compare", "sqnr"]

aten = torch.ops.aten
_WATCH = {aten.conv2d.default, aten.conv1d.default, aten.convolution.default, aten.linear.default,
          aten.matmul.default, aten.add.Tensor, aten.layer_norm.default, aten.softmax.int,
          aten.adaptive_avg_pool2d.default, aten.max_pool2d.default, aten.gelu.default}


@dataclass(frozen=True)
class CompareRow:
    module: str
    op: str
    sqnr_db: float


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - y|^2) in dB (inf when equal)."""
    ref, y = ref.detach().double(), y.detach().double()
    noise = (ref - y).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum().clamp_min(1e-30) / noise))


class _Record(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[tuple, torch.Tensor] = {}
        self._seen: dict[tuple, int] = {}

    def run_node(self, n):
        r = super().run_node(n)
        if n.op == "call_function" and n.target in _WATCH and n.target not in QUANT_OPS \
                and isinstance(r, torch.Tensor):
            lin = lineage(n)
            key = (lin.module_path if lin is not None else "", str(n.target))
            i = self._seen.get(key, 0)
            self._seen[key] = i + 1
            self.values[key + (i,)] = r.detach()
        return r


def compare(reference: fx.GraphModule, compressed: fx.GraphModule, inputs: Sequence,
            lowered=None) -> list[CompareRow]:
    """SQNR of each matched node of `compressed` (and `lowered`'s output) vs `reference`."""
    inputs = tuple(inputs)
    with torch.no_grad():
        ra, rb = _Record(reference), _Record(compressed)
        out_ref = ra.run(*inputs)
        rb.run(*inputs)
    rows = []
    for key, v in ra.values.items():
        if key in rb.values and rb.values[key].shape == v.shape:
            rows.append(CompareRow(key[0] or "<top>", key[1].split(".")[1], sqnr(v, rb.values[key])))
    if lowered is not None:
        ref_flat = torch.utils._pytree.tree_leaves(out_ref)
        got = lowered.run_flat(list(torch.utils._pytree.tree_leaves(inputs)))
        for i, (r, g) in enumerate(zip(ref_flat, got)):
            rows.append(CompareRow(f"<output {i}>", getattr(lowered, "backend", "backend"),
                                   sqnr(r, torch.as_tensor(g))))
    return rows


def format_compare(rows: list[CompareRow], worst: int | None = None) -> str:
    shown = sorted(rows, key=lambda r: r.sqnr_db)[:worst] if worst else rows
    w = max([len(r.module) for r in shown] + [6])
    lines = [f"{'module':<{w}}  {'op':<22} SQNR dB"]
    lines += [f"{r.module:<{w}}  {r.op:<22} {r.sqnr_db:7.1f}" for r in shown]
    return "\n".join(lines)
