"""Latency check of a pruning plan: time each group's layers before and after, undo the slower.

Only the compute ops that read the group's parameters (its convs, linears, matmuls)
are timed, each on random inputs of its real shapes, so checking one group costs a
few milliseconds in eager mode (one small compile per group with Inductor). Timings go
through the latency service (fxpress/latency.py): dense and pruned forms are timed
interleaved and cached by (ops, shapes, ISA, backend), so a second prune of the same
model on the same machine times nothing. A `timer(ops, backend) -> s` replaces it (tests).

    kept, report = check_speed(gm, dep, plan, backend="eager")
"""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
import torch.fx as fx

from ...latency import concrete_shape
from ...timing import median_ms

from ..analysis.dependency import DependencyGraph
from ..analysis.shape_prop import propagate_shapes
from .channel_removal import remove_channels

__all__ = ["check_speed", "time_ops"]

aten = torch.ops.aten
_COMPUTE = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.linear.default,
            aten.convolution.default, aten.conv_transpose2d.input, aten.matmul.default,
            aten.bmm.default, aten.mm.default, aten.scaled_dot_product_attention.default}


def _materialize(gm: fx.GraphModule, a):
    if isinstance(a, fx.Node):
        if a.op == "get_attr":
            obj = gm
            for p in str(a.target).split("."):
                obj = getattr(obj, p)
            return obj.detach()
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):
            shape = concrete_shape(v.shape)
            return torch.randn(shape, dtype=v.dtype) if v.is_floating_point() else torch.zeros(shape, dtype=v.dtype)
        return v
    if isinstance(a, (list, tuple)):
        return type(a)(_materialize(gm, x) for x in a)
    return a


def _ops(gm: fx.GraphModule, names: set[str]) -> list[tuple[Callable, tuple, dict]]:
    out = []
    for n in gm.graph.nodes:
        if n.name in names:
            out.append((n.target, _materialize(gm, n.args), _materialize(gm, dict(n.kwargs))))
    return out


def time_ops(ops, backend: str = "eager", repeat: int = 10) -> float:
    """Median seconds to run `ops` (target, args, kwargs) once each, on `backend`."""
    def run():
        for f, a, k in ops:
            f(*a, **k)
    fn = run
    if backend == "inductor":
        fn = torch.compile(run, dynamic=False)
    return median_ms(fn, (), runs=repeat, warmup=2) / 1e3


def _touched(gm: fx.GraphModule, dep: DependencyGraph, gidx: int) -> set[str]:
    g = dep.groups[gidx]
    attrs = {dep.sites[si].node for si, _ in g.sites}
    return {n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in _COMPUTE
            and any(isinstance(a, fx.Node) and a.name in attrs for a in n.all_input_nodes)}


def _signature(ops) -> tuple:
    def sig(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), str(a.dtype).replace("torch.", ""))
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        return a if isinstance(a, (int, float, bool, str, type(None))) else repr(a)
    return tuple((str(f), sig(a), sig(tuple(sorted(k.items())))) for f, a, k in ops)


def _builder(ops, backend: str):
    def build():
        def run():
            for f, a, k in ops:
                f(*a, **k)
        return (torch.compile(run, dynamic=False) if backend == "inductor" else run), ()
    return build


def check_speed(gm: fx.GraphModule, dep: DependencyGraph, plan: dict[int, np.ndarray], *,
                example_inputs: tuple, backend: str = "eager", timer: Callable | None = None,
                service=None) -> tuple[dict[int, np.ndarray], list[dict]]:
    """Keep a group's removal only if its layers run faster in the pruned graph than whole.

    The whole plan is applied once to a copy; each group's layers are then timed in both
    graphs, so a check costs one copy, one shape propagation and two timings per group.
    """
    trial = copy.deepcopy(gm)
    pruned = np.zeros(dep.num_comps, dtype=bool)
    for comps in plan.values():
        pruned[comps] = True
    remove_channels(trial, _rebind(dep, trial), pruned)
    propagate_shapes(trial, example_inputs)
    kept, rows = {}, []
    for gidx, comps in plan.items():
        names = _touched(gm, dep, gidx)
        if not names:
            kept[gidx] = comps
            continue
        dense_ops, pruned_ops = _ops(gm, names), _ops(trial, names)
        if timer is not None:
            before, after = timer(dense_ops, backend), timer(pruned_ops, backend)
        else:
            if service is None:
                from ...latency import LatencyService
                service = LatencyService(backend)
            ms = service.compare("prune_group", (_signature(dense_ops), _signature(pruned_ops)),
                                 "float32", {"dense": _builder(dense_ops, backend),
                                             "pruned": _builder(pruned_ops, backend)})
            before, after = ms["dense"] / 1e3, ms["pruned"] / 1e3
        faster = after < before
        rows.append({"group": dep.groups[gidx].name, "before_ms": before * 1e3,
                     "after_ms": after * 1e3, "kept": faster})
        if faster:
            kept[gidx] = comps
    return kept, rows


def _rebind(dep: DependencyGraph, gm: fx.GraphModule) -> DependencyGraph:
    """The same analysis pointing at the nodes of a deep copy of its graph module."""
    by_name = {n.name: n for n in gm.graph.nodes}
    fixups = [(k, by_name[n.name], p) for k, n, p in dep.fixups]
    return type(dep)(gm, dep.sites, dep.groups, fixups, dep.unprunable, dep.unresolved, dep.num_comps)
