"""Cost analysis: MACs, parameter count and output bytes per node, summed per user module.

    stats = cost_by_module(gm)        # {"layer1.0.conv1": Cost(macs=..., params=..., bytes=...)}
    total = sum(stats.values(), Cost())
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ...ir.meta import module_path
from ..base import Pass, PassContext, PassResult

__all__ = ["Cost", "node_cost", "cost_by_module", "total_cost", "CostAnalysis"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    macs: int = 0
    params: int = 0
    bytes: int = 0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.macs + o.macs, self.params + o.params, self.bytes + o.bytes)


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _conv_macs(n: fx.Node) -> int:
    w, out = _shape(n.args[1]), _shape(n)
    if w is None or out is None:
        return 0
    transposed = n.target is aten.conv_transpose2d.input or n.target is aten.conv_transpose1d.default
    if n.target is aten.convolution.default and n.args[6]:
        transposed = True
    if transposed:  # each input element scatters into Cout/groups * k outputs
        x = _shape(n.args[0])
        return _numel(x) * _numel(w[1:]) if x else 0
    return _numel(out) * _numel(w[1:])  # w: (Cout, Cin/groups, *k)


def _linear_macs(n: fx.Node) -> int:
    w, out = _shape(n.args[1]), _shape(n)
    return _numel(out) * w[-1] if w and out else 0


def _matmul_macs(n: fx.Node) -> int:
    a, out = _shape(n.args[0]), _shape(n)
    if not a or not out:
        return 0
    return _numel(out) * a[-1]


def _addmm_macs(n: fx.Node) -> int:
    a, out = _shape(n.args[1]), _shape(n)
    return _numel(out) * a[-1] if a and out else 0


_MACS = {
    aten.conv1d.default: _conv_macs, aten.conv2d.default: _conv_macs, aten.conv3d.default: _conv_macs,
    aten.convolution.default: _conv_macs, aten.conv_transpose2d.input: _conv_macs,
    aten.conv_transpose1d.default: _conv_macs,
    aten.linear.default: _linear_macs,
    aten.matmul.default: _matmul_macs, aten.mm.default: _matmul_macs, aten.bmm.default: _matmul_macs,
    aten.addmm.default: _addmm_macs, aten.baddbmm.default: _addmm_macs,
}


def node_cost(gm: fx.GraphModule, n: fx.Node) -> Cost:
    """MACs of a compute node, params of a get_attr, output bytes of any tensor node."""
    macs = 0
    if n.op == "call_function":
        fn = _MACS.get(n.target)
        macs = fn(n) if fn else 0
    params = 0
    if n.op == "get_attr":
        t = _fetch_attr(gm, n.target)
        params = t.numel() if isinstance(t, torch.Tensor) else 0
    v = n.meta.get("val")
    nbytes = v.numel() * v.element_size() if isinstance(v, torch.Tensor) and n.op != "get_attr" else 0
    if n.op == "get_attr" and isinstance(_fetch_attr(gm, n.target), torch.Tensor):
        t = _fetch_attr(gm, n.target)
        nbytes = t.numel() * t.element_size()
    return Cost(macs, params, nbytes)


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def cost_by_module(gm: fx.GraphModule) -> dict[str, Cost]:
    """Cost summed per user module path (get_attr params attributed to their owning module)."""
    out: dict[str, Cost] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        key = str(n.target).rsplit(".", 1)[0] if n.op == "get_attr" else module_path(n)
        c = node_cost(gm, n)
        if c != Cost():
            out[key] = out.get(key, Cost()) + c
    return out


def total_cost(gm: fx.GraphModule) -> Cost:
    """Whole-graph cost; params counted once per distinct tensor, however often it is read."""
    macs = sum(node_cost(gm, n).macs for n in gm.graph.nodes if n.op == "call_function")
    seen, params, nbytes = set(), 0, 0
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = _fetch_attr(gm, n.target)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                params += t.numel()
                nbytes += t.numel() * t.element_size()
    return Cost(macs, params, nbytes)


@dataclass(frozen=True)
class CostAnalysis(Pass):
    """Record total MACs / params / weight bytes in the report (needs shapes)."""

    name: ClassVar[str] = "cost"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c = total_cost(gm)
        return PassResult(gm, False, {"macs": c.macs, "params": c.params, "weight_bytes": c.bytes})
