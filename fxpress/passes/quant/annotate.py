"""AnnotateQuant: the quantizer. It only writes QuantAnnotation records; it rewrites nothing.

Policy (what the int8 kernels of Inductor / ORT / TVM consume):
- conv / linear: activation input, weight (per-channel along the output channels), output
  (after a fused relu/hardtanh when one follows; after the BN during QAT);
- matmul / bmm: both inputs (a constant operand is a weight, channels along its last dim);
- add of two tensors: each input its own range (ORT's QLinearAdd, oneDNN's sum post-op and
  TVM's qnn add all take one scale per input), then the output after a following relu;
- conv2d + add [+ relu] (a residual): the conv's output stays float and only the add's other
  input is quantized, as torchao's X86InductorQuantizer does: Inductor fuses the add (and relu)
  into the int8 conv (``qconv2d_pointwise.binary``); the ORT backend requantizes the conv output
  for QLinearConv -> QLinearAdd (backends/onnx/requant.py). Each add takes the first such conv
  in graph order whose only user it is. ``Quantize(conv_add="separate")`` instead quantizes the
  conv output like any other (ORT's form: the ORT lowering is then exact);
- cat: inputs and output share one range; max-pool, avg-pool: input and output share one
  range (int8 in, int8 out with the same qparams, so the pool needs no requantization);
- embedding: weight only (per row); its output stays float;
- flatten / view / reshape between a quantized output and a quantized input: input and output
  share the producer's range, so the backends drop the DQ -> Reshape -> Q pair (ORT) or keep the
  tensor int8 across it (Inductor's qreshape) instead of requantizing to a second scale.
Dynamic mode annotates only linear inputs, matmuls with a constant operand (and embedding
weights); a matmul of two activations stays float (named in stats["left"]).

Edges are numbered as in ``node.all_input_nodes``. ``QuantSpec.shared_with`` names the node
whose annotation owns a sharing group: every edge or output carrying the same name gets one
observer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import (QuantAnnotation, QuantSpec, ResidualQuant, get_record, module_path,
                        set_record)
from ..base import Pass, PassContext, PassResult

__all__ = ["AnnotateQuant", "OP_TABLE", "FUSED_UNARY", "chain_end", "is_transformer"]

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
_RESHAPE = {aten.flatten.using_ints, aten.view.default, aten.reshape.default}
_BN = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_KIND = {"conv": "conv", "linear": "linear", "matmul": "matmul", "add": "add", "cat": "cat",
         "max_pool": "pool", "avg_pool": "pool", "embedding": "embedding"}


def _is_float(n: Any) -> bool:
    if not isinstance(n, fx.Node):
        return False
    v = n.meta.get("val")
    return v.is_floating_point() if isinstance(v, torch.Tensor) else True


_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}


def is_transformer(gm: fx.GraphModule) -> bool:
    """A graph with a layer_norm or an attention (a softmax of a matmul, through scaling /
    masking adds): the quantization defaults for transformers apply (observer, SmoothQuant,
    float policy; see Quantize). LeViT normalizes with BatchNorm but attends like a ViT."""
    for n in gm.graph.nodes:
        if n.target is aten.layer_norm.default:
            return True
        if n.target in _SOFTMAX:
            src, hops = n.args[0], 0
            while isinstance(src, fx.Node) and hops < 4 and src.target not in _MATMUL:
                src, hops = (src.args[0] if src.args else None), hops + 1
            if isinstance(src, fx.Node) and src.target in _MATMUL:
                return True
    return False


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
        left: list[dict] = []
        separate = cfg.conv_add == "separate"
        residual = {} if dynamic or separate else _residual_convs(gm, cfg, qat)
        if cfg.conv_add == "auto" and not qat:
            # the IR takes ORT's form (the conv output quantized, lowered exactly there); the
            # record lets a backend with a conv + add kernel (Inductor) fuse at lowering
            for add, operand in residual.items():
                set_record(_conv_of(operand), ResidualQuant(add=add.name))
            if residual:
                counts["conv_add_auto"] = len(residual)
            residual = {}
        fused_convs = {_conv_of(v) for v in residual.values()}
        transformer = is_transformer(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in OP_TABLE:
                continue
            op = OP_TABLE[node.target]
            if _KIND[op] not in cfg.ops or not node.users:
                continue  # (an op nothing reads, as export leaves some: no data reaches it)
            path = module_path(node)
            if cfg.skipped(path):
                skipped.append(path)
                continue
            if dynamic and op not in ("linear", "matmul", "embedding"):
                continue
            wspec, aspec = cfg.specs_for(path, transformer=transformer)
            inputs = node.all_input_nodes
            fused = residual.get(node)          # the conv output an add takes in float
            ann_in: list[tuple[int, QuantSpec]] = []
            out_spec: QuantSpec | None = None
            out_node = node
            if op in ("conv", "linear"):
                x, w = node.args[0], node.args[1]
                if isinstance(w, fx.Node) and w.op != "get_attr":
                    # a weight computed at run time (a graph input, a parametrization WeightOps
                    # could not fold): no int8 kernel takes it, and it has no calibrated range
                    left.append({"module": path, "op": op, "why": "weight is not a constant"})
                    continue
                if aspec is not None and _is_float(x):
                    ann_in.append((inputs.index(x), aspec))
                if wspec is not None and isinstance(w, fx.Node):
                    ann_in.append((inputs.index(w), _weight_spec(wspec, w, axis=0)))
                out_spec = aspec if cfg.quantize_outputs and node not in fused_convs else None
                out_node = chain_end(node, through_bn=qat)
            elif op == "matmul":
                if dynamic and not any(isinstance(a, fx.Node) and a.op == "get_attr"
                                       for a in node.args[:2]):
                    # two activations (attention scores / context): no weight to store int8,
                    # and per-call ranges of both cost accuracy (real MiniLM, session 7); float
                    left.append({"module": path, "op": op,
                                 "why": "policy: dynamic mode keeps activation x activation "
                                        "matmuls float"})
                    continue
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
                share = node.name if op in ("cat", "max_pool", "avg_pool") else None
                ann_in = [(inputs.index(a), replace(aspec, shared_with=share)) for a in tensors
                          if a is not fused]
                out_spec = replace(aspec, shared_with=share)
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
        if residual:
            counts["conv_add"] = len(residual)
        if not dynamic:
            n_shape = _share_through_reshapes(gm)
            if n_shape:
                counts["reshape"] = n_shape
        stats = {"annotated": dict(counts), "skipped": skipped}
        if left:
            stats["left"] = left
        return PassResult(gm, False, stats)


def _share_through_reshapes(gm: fx.GraphModule) -> int:
    """Annotate shape-only ops that sit between a quantized output and a quantized input."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _RESHAPE:
            continue
        prod = node.args[0]
        ann = get_record(prod, QuantAnnotation) if isinstance(prod, fx.Node) else None
        if ann is None or ann.output is None or get_record(node, QuantAnnotation) is not None:
            continue
        if not any((a := get_record(u, QuantAnnotation)) is not None and any(
                u.all_input_nodes[i] is node for i, _ in a.inputs) for u in node.users):
            continue
        spec = replace(ann.output, shared_with=node.name)
        set_record(node, QuantAnnotation(inputs=((0, spec),), output=spec))
        n += 1
    return n


def _quantized_here(node: fx.Node, cfg, kind: str) -> bool:
    """Would the main loop quantize `node` (an op of `kind`) with a float activation spec?"""
    path = module_path(node)
    if kind not in cfg.ops or cfg.skipped(path):
        return False
    wspec, aspec = cfg.specs_for(path)
    return aspec is not None and (kind != "conv" or wspec is not None)


def _conv_of(operand: fx.Node) -> fx.Node:
    return operand.args[0] if operand.target in _BN else operand


def _residual_convs(gm: fx.GraphModule, cfg, qat: bool) -> dict[fx.Node, fx.Node]:
    """{add: the conv2d output (the BN after it during QAT) it fuses}, torchao's pairing."""
    pairs: dict[fx.Node, fx.Node] = {}
    for conv in gm.graph.nodes:
        if conv.op != "call_function" or conv.target is not aten.conv2d.default:
            continue
        operand = conv
        if qat and len(conv.users) == 1 and next(iter(conv.users)).target in _BN:
            operand = next(iter(conv.users))
        if len(operand.users) != 1:
            continue
        (add,) = operand.users
        if add.op != "call_function" or OP_TABLE.get(add.target) != "add" or add in pairs:
            continue
        a, b = add.args[:2]
        other = b if a is operand else a
        if other is operand or not (_is_float(other) and other.op != "get_attr"):
            continue  # x + x, or an add of a constant: no binary int8 kernel
        if _quantized_here(conv, cfg, "conv") and _quantized_here(add, cfg, "add"):
            pairs[add] = operand
    return pairs


def _weight_spec(spec: QuantSpec, w: fx.Node, axis: int) -> QuantSpec:
    if spec.qscheme != "per_channel":
        return replace(spec, axis=None)
    v = w.meta.get("val")
    nd = v.dim() if isinstance(v, torch.Tensor) else 2
    return replace(spec, axis=axis % nd)
