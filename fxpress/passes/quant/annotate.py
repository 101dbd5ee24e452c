"""AnnotateQuant: the quantizer. It only writes QuantAnnotation records; it rewrites nothing.

Policy (what the int8 kernels of Inductor / ORT / TVM consume):
- conv / linear: activation input, weight (per-channel along the output channels), output
  (after a fused relu/hardtanh when one follows; after the BN during QAT);
- matmul / bmm: both inputs (a constant operand is a weight, channels along its last dim);
- add of two tensors: inputs share one range (an int8 add needs equal scales), then output;
- cat: inputs and output share one range; max-pool: input and output share one range;
  avg-pool: input and output;
- embedding: weight only (per row); its output stays float.
Dynamic mode annotates only linear/matmul inputs (and embedding weights).

Edges are numbered as in ``node.all_input_nodes``. ``QuantSpec.shared_with`` names the node
whose annotation owns a sharing group: every edge or output carrying the same name gets one
observer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import QuantAnnotation, QuantSpec, module_path, set_record
from ..base import Pass, PassContext, PassResult

__all__ = ["AnnotateQuant", "OP_TABLE", "FUSED_UNARY", "chain_end"]

aten = torch.ops.aten
OP_TABLE: dict[Any, str] = {
    aten.conv1d.default: "conv", aten.conv2d.default: "conv", aten.conv3d.default: "conv",
    aten.linear.default: "linear",
    aten.matmul.default: "matmul", aten.bmm.default: "matmul", aten.mm.default: "matmul",
    aten.add.Tensor: "add", aten.add_.Tensor: "add",
    aten.cat.default: "cat",
    aten.max_pool1d.default: "max_pool", aten.max_pool2d.default: "max_pool",
    aten.max_pool3d.default: "max_pool",
    aten.avg_pool1d.default: "avg_pool", aten.avg_pool2d.default: "avg_pool",
    aten.adaptive_avg_pool1d.default: "avg_pool", aten.adaptive_avg_pool2d.default: "avg_pool",
    aten.embedding.default: "embedding",
}
# elementwise ops an int8 kernel applies before requantizing its output (post-op fusion)
FUSED_UNARY = {aten.relu.default, aten.relu_.default, aten.hardtanh.default,
               aten.hardtanh_.default, aten.clamp.default, aten.relu6.default}
_BN = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_KIND = {"conv": "conv", "linear": "linear", "matmul": "matmul", "add": "add", "cat": "cat",
         "max_pool": "pool", "avg_pool": "pool", "embedding": "embedding"}


def _is_float(n: Any) -> bool:
    if not isinstance(n, fx.Node):
        return False
    v = n.meta.get("val")
    return v.is_floating_point() if isinstance(v, torch.Tensor) else True


def chain_end(node: fx.Node, *, through_bn: bool = False) -> fx.Node:
    """The last node of `node` -> [batch_norm] -> [relu-like] when each link has one user."""
    end = node
    if through_bn and len(end.users) == 1:
        (u,) = end.users
        if u.target in _BN:
            end = u
    if len(end.users) == 1:
        (u,) = end.users
        if u.op == "call_function" and u.target in FUSED_UNARY:
            end = u
    return end


@dataclass(frozen=True)
class AnnotateQuant(Pass):
    """Write QuantAnnotation records (which edges and outputs get which QuantSpec) on quantizable ops."""

    name: ClassVar[str] = "quant_annotate"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from .config import Quantize
        cfg = self.config or Quantize()
        dynamic, qat = cfg.mode == "dynamic", cfg.mode == "qat"
        counts: dict[str, int] = {}
        skipped: list[str] = []
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in OP_TABLE:
                continue
            op = OP_TABLE[node.target]
            if _KIND[op] not in cfg.ops:
                continue
            path = module_path(node)
            if cfg.skipped(path):
                skipped.append(path)
                continue
            if dynamic and op not in ("linear", "matmul", "embedding"):
                continue
            wspec, aspec = cfg.specs_for(path)
            inputs = node.all_input_nodes
            ann_in: list[tuple[int, QuantSpec]] = []
            out_spec: QuantSpec | None = None
            out_node = node
            if op in ("conv", "linear"):
                x, w = node.args[0], node.args[1]
                if aspec is not None and _is_float(x):
                    ann_in.append((inputs.index(x), aspec))
                if wspec is not None and isinstance(w, fx.Node):
                    ann_in.append((inputs.index(w), _weight_spec(wspec, w, axis=0)))
                out_spec = aspec if cfg.quantize_outputs else None
                out_node = chain_end(node, through_bn=qat)
            elif op == "matmul":
                for a in node.args[:2]:
                    if not isinstance(a, fx.Node):
                        continue
                    if a.op == "get_attr":
                        if wspec is not None:
                            ann_in.append((inputs.index(a), _weight_spec(wspec, a, axis=-1)))
                    elif aspec is not None and _is_float(a):
                        ann_in.append((inputs.index(a), aspec))
                out_spec = aspec if cfg.quantize_outputs else None
            elif op == "embedding":
                w = node.args[0]
                if wspec is not None and isinstance(w, fx.Node) and w.op == "get_attr":
                    ann_in.append((inputs.index(w), _weight_spec(wspec, w, axis=0)))
            elif aspec is not None:
                tensors = [a for a in inputs if _is_float(a) and a.op != "get_attr"]
                if op in ("add", "cat") and len(tensors) < 2:
                    continue  # add of a constant or a scalar: nothing for an int8 kernel to share
                share = node.name if op in ("add", "cat", "max_pool") else None
                ann_in = [(inputs.index(a), replace(aspec, shared_with=share)) for a in tensors]
                out_spec = replace(aspec, shared_with=node.name if op in ("cat", "max_pool") else None)
                if op == "add":
                    out_node = chain_end(node)
            if dynamic:
                out_spec = None
            if not ann_in and out_spec is None:
                continue
            set_record(node, QuantAnnotation(inputs=tuple(ann_in),
                                             output=out_spec if out_node is node else None))
            if out_node is not node and out_spec is not None:
                set_record(out_node, QuantAnnotation(output=out_spec))
            counts[op] = counts.get(op, 0) + 1
        return PassResult(gm, False, {"annotated": dict(counts), "skipped": skipped})


def _weight_spec(spec: QuantSpec, w: fx.Node, axis: int) -> QuantSpec:
    if spec.qscheme != "per_channel":
        return replace(spec, axis=None)
    v = w.meta.get("val")
    nd = v.dim() if isinstance(v, torch.Tensor) else 2
    return replace(spec, axis=axis % nd)
