"""FoldQDQ: simplify quantize/dequantize chains and fold constant weight quantization.

Rules (counted per name so tests can assert they fired):
- ``constant_quantize``: quantize(get_attr fp32 weight) -> an int8 buffer (no run-time quantize);
- ``redundant_dq_q``: quantize(dequantize(y, p), p) with the same qparams -> y;
- ``requantize``: quantize(dequantize(quantize(x, p1), p1), p2) -> quantize(x, p2): two
  quantization points in a row keep only the last one (one rounding instead of two).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401
import torch.fx as fx

from ...ir.meta import lineage, set_record
from ..base import Pass, PassContext, PassResult
from ..rewrite import NodeRule, apply_rules
from .convert import fetch_attr, register_tensor

__all__ = ["FoldQDQ", "RULES", "fuse_residual_quant"]

qd = torch.ops.quantized_decomposed
_Q = {qd.quantize_per_tensor.default, qd.quantize_per_channel.default}


def _constant(gm, a):
    if isinstance(a, fx.Node):
        if a.op != "get_attr":
            raise LookupError
        return fetch_attr(gm, a.target)
    return a


def _fold_constant_quantize(gm: fx.GraphModule, node: fx.Node):
    try:
        args = [_constant(gm, a) for a in node.args]
    except LookupError:
        return None
    with torch.no_grad():
        value = node.target(*args)
    src = node.args[0]
    target = register_tensor(gm, f"{src.target}_int8", value)
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(target)
    new.meta["val"] = value
    if lineage(src) is not None:
        set_record(new, lineage(src).derived("get_attr:int8"))
    return new


def _is(n, target) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is target


def _redundant_dq_q(gm: fx.GraphModule, node: fx.Node):
    dq = node.args[0]
    if _is(dq, qd.dequantize_per_tensor.default) and tuple(dq.args[1:6]) == tuple(node.args[1:6]):
        return dq.args[0]
    return None


def _requantize(gm: fx.GraphModule, node: fx.Node):
    dq = node.args[0]
    if not _is(dq, qd.dequantize_per_tensor.default) or len(dq.users) != 1:
        return None
    q1 = dq.args[0]
    if not _is(q1, qd.quantize_per_tensor.default) or len(q1.users) != 1:
        return None
    if tuple(dq.args[1:6]) == tuple(node.args[1:6]):
        return None  # same qparams: redundant_dq_q's case
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(node.target, (q1.args[0],) + tuple(node.args[1:]))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val",)})
    for k, v in (node.meta.get("fxpress") or {}).items():
        set_record(new, v)
    return new


RULES = [
    NodeRule("constant_quantize", _Q, _fold_constant_quantize),
    NodeRule("redundant_dq_q", {qd.quantize_per_tensor.default}, _redundant_dq_q),
    NodeRule("requantize", {qd.quantize_per_tensor.default}, _requantize),
]


@dataclass(frozen=True)
class FoldQDQ(Pass):
    """Fold constant weight quantization and remove redundant or repeated q/dq chains."""

    name: ClassVar[str] = "quant_fold"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        hits = apply_rules(gm, RULES)
        if sum(hits.values()):
            from ..cleanup.dce import remove_unused_attributes
            remove_unused_attributes(gm)
            gm.recompile()
        return PassResult(gm, bool(sum(hits.values())), {r.name: hits[r.name] for r in RULES})


def fuse_residual_quant(gm: fx.GraphModule) -> int:
    """Drop the Q/DQ that ``Quantize(conv_add="auto")`` put on a residual conv's output
    (``ResidualQuant`` record), giving ``conv -> add(dq(other)) [-> relu] -> q``: the form
    Inductor (and fxpress's packed oneDNN convs) run as one conv + add kernel. Call it on the
    copy a backend with such a kernel compiles, never on the user's IR. Returns how many."""
    from ...ir.meta import ResidualQuant, get_record
    qd = torch.ops.quantized_decomposed
    done = 0
    for conv in list(gm.graph.nodes):
        rec = get_record(conv, ResidualQuant)
        if rec is None or len(conv.users) != 1:
            continue
        (q,) = conv.users
        if q.target is not qd.quantize_per_tensor.default or len(q.users) != 1:
            continue
        (dq,) = q.users
        if dq.target is not qd.dequantize_per_tensor.default or len(dq.users) != 1 \
                or next(iter(dq.users)).name != rec.add:
            continue
        dq.replace_all_uses_with(conv)
        gm.graph.erase_node(dq)
        gm.graph.erase_node(q)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
