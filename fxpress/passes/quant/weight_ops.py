"""WeightOps: every weight-bearing op form becomes a quantization unit (a linear or a conv on a constant).

Models reach the IR with their weights in several forms besides ``aten.linear``:

- ``addmm(b, x, W)`` with ``W`` of shape [in, out] (Hugging Face GPT-2's ``Conv1D``);
- ``matmul(x, W.T)`` / ``matmul(x, W)`` / ``mm`` with a 2-D parameter (Falcon's layers capture
  as ``matmul(x, numpy_T(weight))``), ``einsum("...d,ed->...e", x, W)`` (Mamba-style mixers);
- a conv or linear whose weight is *computed* from parameters (``weight_norm``'s ``g * v / |v|``,
  parametrizations): wav2vec2's positional conv.

The quantizer's unit is an op on a constant weight, so this pass rewrites each of them into
``aten.linear(x, W', b)`` / the same conv on one constant ``W'`` (evaluated once here, stored as
a buffer beside the original parameter, ``<weight>_lin`` / ``<weight>_folded``): the same
function, and from then on the same int8 Q/DQ form, SmoothQuant, observers and backend kernels
(ORT DynamicQuantizeMatMul / QGemm / QLinearConv, Inductor's qlinear) as any linear or conv.

    stats = WeightOps().run(gm, ctx).stats   # {"addmm": 8, "matmul": 0, ...}

A weight read by other ops too (tied) is copied, never changed in place. A form left alone
(e.g. ``bmm`` with a 3-D parameter, a batched einsum) is named in ``stats["left"]`` with why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import lineage, module_path, set_record
from ..base import Pass, PassContext, PassResult
from ..cleanup.constant_fold import _impure
from .convert import constant_node, fetch_attr

__all__ = ["WeightOps", "constant_value"]

aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_MATMULS = {aten.matmul.default, aten.mm.default}


def _pure(node: fx.Node) -> bool:
    """Evaluable once at compile time (constant_fold's rule: no random / mutating op)."""
    return node.op == "call_function" and not _impure(node)


def constant_value(gm: fx.GraphModule, node: Any, memo: dict | None = None) -> torch.Tensor | None:
    """The value of `node` when it depends on get_attr constants only (else None).

    `memo` (one dict per graph walk) holds which nodes are constant and the values computed."""
    memo = {} if memo is None else memo
    if "const" not in memo:  # one forward sweep: which nodes read constants only
        const = memo["const"] = set()
        for n in gm.graph.nodes:
            if n.op == "get_attr" or (_pure(n) and n.all_input_nodes
                                      and all(i in const for i in n.all_input_nodes)):
                const.add(n)
    if not isinstance(node, fx.Node) or node not in memo["const"]:
        return None
    values = memo.setdefault("values", {})
    if node not in values:
        if node.op == "get_attr":
            value = fetch_attr(gm, node.target)
        else:
            env = {i: constant_value(gm, i, memo) for i in node.all_input_nodes}
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            with torch.no_grad():
                value = node.target(*args, **kwargs)
        values[node] = value if isinstance(value, torch.Tensor) else None
    return values[node]


def _root_attr(node: fx.Node) -> str:
    """The first parameter a constant subgraph reads (names the folded buffer)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.op == "get_attr":
            return str(n.target)
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return node.name


def _einsum_weight(eq: str, operands: list) -> tuple[int, bool] | None:
    """(index of the 2-D weight operand, whether it is [out, in]) for an einsum that is a linear
    over the activation's last dim: ``...d,ed->...e`` / ``bld,de->ble`` (either operand order)."""
    if len(operands) != 2 or "->" not in eq:
        return None
    ins, out = eq.replace(" ", "").split("->")
    terms = ins.split(",")
    if len(terms) != 2:
        return None
    for wi in (0, 1):
        w, x = terms[wi], terms[1 - wi]
        if len(w) != 2 or "." in w:
            continue
        body = x.replace("...", "")
        if not body or body[-1] not in w:
            continue
        k = body[-1]
        n = w.replace(k, "")
        if len(n) != 1 or n in x or k in out:
            continue
        if out != x[:-1] + n:
            continue
        return wi, w.index(k) == 1
    return None


@dataclass(frozen=True)
class WeightOps(Pass):
    """Rewrite addmm / matmul / mm / einsum on a 2-D constant to linear; fold computed weights."""

    name: ClassVar[str] = "quant_weight_ops"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        counts: dict[str, int] = {}
        left: list[dict] = []
        memo: dict = {}
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            t = node.target
            if t is aten.addmm.default:
                done = self._addmm(gm, node, memo)
                kind = "addmm"
            elif t in _MATMULS:
                done = self._matmul(gm, node, memo)
                kind = "matmul"
            elif t is aten.einsum.default:
                done = self._einsum(gm, node, memo)
                kind = "einsum"
            elif t in _CONVS or t is aten.linear.default:
                done = self._computed_weight(gm, node, memo)
                kind = "computed_weight"
            else:
                continue
            if done is True:
                counts[kind] = counts.get(kind, 0) + 1
            elif isinstance(done, str):
                left.append({"node": node.name, "module": module_path(node), "op": str(t),
                             "why": done})
        if counts:
            graph.eliminate_dead_code()
            from ..cleanup.dce import remove_unused_attributes
            remove_unused_attributes(gm)
            graph.lint()
            gm.recompile()
        stats: dict[str, Any] = dict(counts)
        if left:
            stats["left"] = left
        return PassResult(gm, bool(counts), stats)

    # -- the forms ------------------------------------------------------------------------
    @staticmethod
    def _constant(gm, at: fx.Node, src: fx.Node, value: torch.Tensor, suffix: str) -> fx.Node:
        """A get_attr (before `at`) of `value`, a buffer named after the parameter `src` reads."""
        return constant_node(gm, at, _root_attr(src) + suffix, value.contiguous())

    @staticmethod
    def _linear(gm, old: fx.Node, x: fx.Node, w: fx.Node, b: Any) -> None:
        with gm.graph.inserting_before(old):
            new = gm.graph.call_function(aten.linear.default, (x, w, b) if b is not None else (x, w))
        new.meta = dict(old.meta)
        lin = lineage(old)
        if lin is not None:
            set_record(new, lin.derived("linear"))
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)

    def _addmm(self, gm, node, memo):
        b, x, w = node.args[:3]
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha/beta"
        wv = constant_value(gm, w, memo)
        if wv is None or wv.dim() != 2:
            return None if wv is None else "weight is not 2-D"
        bv = constant_value(gm, b, memo) if isinstance(b, fx.Node) else None
        if bv is None or bv.dim() != 1:
            return "bias is not a 1-D constant"   # a broadcast 2-D bias has no linear form
        wn = self._constant(gm, node, w, wv.t(), "_lin")
        bn = b if b.op == "get_attr" else self._constant(gm, node, b, bv, "_folded")
        self._linear(gm, node, x, wn, bn)
        return True

    def _matmul(self, gm, node, memo):
        a, w = node.args[:2]
        wv = constant_value(gm, w, memo)
        if constant_value(gm, a, memo) is not None:
            return None if wv is not None else "constant left operand (W @ x)"
        if wv is None:
            return None
        if wv.dim() != 2:
            return f"{wv.dim()}-D constant operand (batched weights have no linear form)"
        av = a.meta.get("val") if isinstance(a, fx.Node) else None
        if isinstance(av, torch.Tensor) and av.dim() < 1:
            return None
        self._linear(gm, node, a, self._constant(gm, node, w, wv.t(), "_lin"), None)
        return True

    def _einsum(self, gm, node, memo):
        eq, operands = node.args[0], list(node.args[1])
        found = _einsum_weight(eq, operands)
        if found is None:
            if any(constant_value(gm, o, memo) is not None for o in operands):
                return f"einsum {eq!r} is not a linear over the activation's last dim"
            return None
        wi, out_in = found
        w, x = operands[wi], operands[1 - wi]
        wv = constant_value(gm, w, memo)
        if wv is None or constant_value(gm, x, memo) is not None:
            return None
        wv = wv if out_in else wv.t()
        self._linear(gm, node, x, self._constant(gm, node, w, wv, "_lin"), None)
        return True

    def _computed_weight(self, gm, node, memo):
        w = node.args[1] if len(node.args) > 1 else None
        if not isinstance(w, fx.Node) or w.op == "get_attr":
            return None
        wv = constant_value(gm, w, memo)
        if wv is None:
            return None
        node.replace_input_with(w, self._constant(gm, node, w, wv, "_folded"))
        return True
