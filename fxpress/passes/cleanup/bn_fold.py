"""BatchNorm folding: conv/linear -> batch_norm(eval) becomes one conv/linear with new weights.

    w' = w * gamma / sqrt(var + eps)     (per output channel)
    b' = (b - mean) * gamma / sqrt(var + eps) + beta
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ...ir.meta import Lineage, lineage, set_record
from ...registry import recipe_entry
from ..base import Pass, PassContext, PassResult

__all__ = ["FoldBatchNorm", "fold_bn_weights"]

aten = torch.ops.aten
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_LINEAR = {aten.linear.default}
# eval-mode batch norm forms in export's training IR and after decompositions
_BN = {aten.batch_norm.default: "batch_norm",
       aten._native_batch_norm_legit_no_training.default: "no_training"}


def fold_bn_weights(w, b, gamma, beta, mean, var, eps):
    scale = (gamma if gamma is not None else torch.ones_like(var)) * torch.rsqrt(var + eps)
    shape = (-1,) + (1,) * (w.dim() - 1)
    w2 = w * scale.reshape(shape)
    b0 = b if b is not None else torch.zeros_like(mean)
    b2 = (b0 - mean) * scale + (beta if beta is not None else torch.zeros_like(mean))
    return w2, b2


def _attr(gm, node):
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError
    obj = gm
    for p in str(node.target).split("."):
        obj = getattr(obj, p)
    return obj


def _bn_args(node: fx.Node):
    a = list(node.args)
    if node.target is aten.batch_norm.default:
        x, gamma, beta, mean, var, training, _, eps = a[:8]
        return x, gamma, beta, mean, var, training, eps
    x, gamma, beta, mean, var, _, eps = a[:7]
    return x, gamma, beta, mean, var, False, eps


def _set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if attr in mod._parameters or not hasattr(mod, attr):
        mod.register_parameter(attr, torch.nn.Parameter(value.detach().clone()))
    else:
        mod.register_buffer(attr, value.detach().clone())


@recipe_entry
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold eval-mode batch_norm into the conv1d/2d/3d or linear that feeds it."""

    name: ClassVar[str] = "fold_bn"
    ensures: ClassVar[tuple[str, ...]] = ("bn_folded",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded, skipped = 0, []
        for bn in list(gm.graph.nodes):
            if bn.op != "call_function" or bn.target not in _BN:
                continue
            x, g_n, b_n, m_n, v_n, training, eps = _bn_args(bn)
            prod = x if isinstance(x, fx.Node) else None
            why = None
            if training:
                why = "training-mode batch_norm"
            elif prod is None or prod.target not in _CONVS | _LINEAR:
                why = "not fed by conv/linear"
            elif len(prod.users) != 1:
                why = "conv/linear output has other users"
            elif prod.target in _LINEAR and (n := _shape_len(prod)) is not None and n != 2:
                why = "linear output is not 2-D (channel axis is not 1)"
            if why:
                skipped.append(f"{bn.name}: {why}")
                continue
            try:
                w = _attr(gm, prod.args[1])
                b = _attr(gm, prod.args[2] if len(prod.args) > 2 else prod.kwargs.get("bias"))
                gamma, beta, mean, var = (_attr(gm, a) for a in (g_n, b_n, m_n, v_n))
            except LookupError:
                skipped.append(f"{bn.name}: weights are not parameters")
                continue
            if sum(1 for u in prod.args[1].users) != 1:
                skipped.append(f"{bn.name}: conv weight shared with other nodes")
                continue
            with torch.no_grad():
                w2, b2 = fold_bn_weights(w, b, gamma, beta, mean, var, eps)
            _set_param(gm, prod.args[1].target, w2)
            args = list(prod.args)
            if len(args) > 2 and isinstance(args[2], fx.Node):
                _set_param(gm, args[2].target, b2)
            else:
                bias_target = prod.args[1].target.rsplit(".", 1)[0] + ".bias" \
                    if "." in prod.args[1].target else f"{prod.args[1].target}_bias"
                bias_target = _free(gm, bias_target)
                _set_param(gm, bias_target, b2)
                with gm.graph.inserting_before(prod):
                    bias_node = gm.graph.get_attr(bias_target)
                set_record(bias_node, Lineage(bias_target.rsplit(".", 1)[0], "", "get_attr"))
                while len(args) < 3:
                    args.append(None)
                args[2] = bias_node
            prod.args = tuple(args)
            users = [bn] if bn.target is aten.batch_norm.default else \
                [u for u in bn.users if u.target is operator.getitem]
            if bn.target is aten.batch_norm.default:
                bn.replace_all_uses_with(prod)
            else:
                for u in users:
                    if u.args[1] == 0:
                        u.replace_all_uses_with(prod)
            lin = lineage(prod)
            if lin:
                set_record(prod, lin.derived(lin.original_op + "+batch_norm"))
            folded += 1
        if folded:
            gm.graph.eliminate_dead_code()
            from .dce import remove_unused_attributes
            remove_unused_attributes(gm)
            gm.recompile()
        return PassResult(gm, folded > 0, {"folded": folded, "skipped": skipped})


def _shape_len(n: fx.Node):
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else None


def _free(gm, target: str) -> str:
    name, i = target, 0
    while True:
        owner, _, attr = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if not hasattr(mod, attr):
            return name
        i += 1
        name = f"{target}_{i}"
