"""Constant folding: evaluate subgraphs that read only parameters, store results as buffers.

Dequantize ops on int8 weights are *not* folded by default: the int8 storage followed
by a dequantize is the form backends turn into int8 kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ...ir.meta import lineage, set_record
from ...registry import recipe_entry
from ..base import Pass, PassContext, PassResult

__all__ = ["ConstantFold", "is_quant_op"]


def is_quant_op(node: fx.Node) -> bool:
    ns = getattr(node.target, "namespace", None)
    return ns in ("quantized_decomposed", "torchao") or "dequantize" in str(node.target)


def _impure(node: fx.Node) -> bool:
    t = node.target
    if getattr(t, "_schema", None) is not None and t._schema.is_mutable:
        return True
    return any(s in str(t) for s in ("rand", "dropout", "bernoulli", "normal", "empty"))


@recipe_entry
@dataclass(frozen=True)
class ConstantFold(Pass):
    """Replace parameter-only subgraphs (no placeholder upstream) by precomputed buffers."""

    name: ClassVar[str] = "constant_fold"
    fold_dequantize: bool = False

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        const: dict[fx.Node, torch.Tensor | object] = {}
        folded = 0
        for n in gm.graph.nodes:
            if n.op == "get_attr":
                const[n] = _fetch(gm, n.target)
                continue
            if n.op != "call_function" or _impure(n):
                continue
            if is_quant_op(n) and not self.fold_dequantize:
                continue
            inputs = n.all_input_nodes
            if not inputs or not all(i in const for i in inputs):
                continue
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: const[a])
            with torch.no_grad():
                const[n] = n.target(*args, **kwargs)
        # Fold only the frontier: constant nodes with a non-constant user (or the output).
        for n, value in list(const.items()):
            if n.op == "get_attr" or not isinstance(value, torch.Tensor):
                continue
            if all(u in const for u in n.users) and n.users:
                continue
            attr = _fresh_name(gm, f"_folded_{n.name}")
            gm.register_buffer(attr, value.detach().clone())
            with gm.graph.inserting_before(n):
                new = gm.graph.get_attr(attr)
            new.meta["val"] = n.meta.get("val")
            if lineage(n):
                set_record(new, lineage(n))
            n.replace_all_uses_with(new)
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            from .dce import remove_unused_attributes
            remove_unused_attributes(gm)
            gm.recompile()
        return PassResult(gm, folded > 0, {"folded": folded})


def _fetch(gm, target):
    obj = gm
    for p in str(target).split("."):
        obj = getattr(obj, p)
    return obj


def _fresh_name(gm, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
