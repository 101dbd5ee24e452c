"""InsertObservers: put an observer (or, for QAT, a fake-quant) module on every annotated edge/output.

Generic over the annotation: an output spec puts one observer after the node that all its
users read; an input spec puts one on that edge, reusing the producer's output observer when
the specs agree (one range per tensor) and sharing one observer among edges to the same
producer with the same spec. Edges/outputs whose specs name the same ``shared_with`` group,
and any observers merged by reuse, end up calling one module: equal qparams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import QuantAnnotation, QuantSpec, get_record, lineage, set_record
from ..base import Pass, PassContext, PassResult
from .annotate import FUSED_UNARY, _BN

__all__ = ["InsertObservers", "observer_nodes", "OBSERVER_PREFIX"]

OBSERVER_PREFIX = "_fxq_obs_"


def observer_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, torch.nn.Module]]:
    """(node, module) for every observer/fake-quant call in the graph."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(OBSERVER_PREFIX):
            out.append((n, gm.get_submodule(n.target)))
    return out


def _compatible(a: QuantSpec, b: QuantSpec) -> bool:
    return (a.dtype, a.qscheme, a.symmetric, a.dynamic, a.narrow_range, a.reduce_range) == \
           (b.dtype, b.qscheme, b.symmetric, b.dynamic, b.narrow_range, b.reduce_range)


def _key(s: QuantSpec):
    return (s.dtype, s.qscheme, s.symmetric, s.axis, s.dynamic, s.narrow_range, s.reduce_range,
            s.observer)


def _producer_op(end: fx.Node) -> fx.Node:
    """The annotated op whose output `end` is (walking back over fused relu / BN)."""
    n = end
    while n.op == "call_function" and (n.target in FUSED_UNARY or n.target in _BN) \
            and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    if n.op == "call_module" and not str(n.target).startswith(OBSERVER_PREFIX):
        return n  # QAT conv+BN module
    return n


@dataclass(frozen=True)
class InsertObservers(Pass):
    """Insert observer (fake-quant for QAT) call_module nodes where QuantAnnotation records ask."""

    name: ClassVar[str] = "quant_insert_observers"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from .config import Quantize
        cfg = self.config or Quantize()
        make = _factory(cfg)
        graph = gm.graph
        parent: dict[fx.Node, fx.Node] = {}          # union-find over observer nodes
        spec_of: dict[fx.Node, QuantSpec] = {}
        consumers: dict[fx.Node, set[str]] = {}
        out_obs: dict[fx.Node, fx.Node] = {}         # producer -> its output observer
        edge_obs: dict[tuple, fx.Node] = {}          # (producer, spec key) -> edge observer
        groups: dict[str, fx.Node] = {}              # shared_with name -> an observer in it

        def find(n):
            while parent[n] is not n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        def union(a, b):
            parent[find(a)] = find(b)

        def new_obs(after: fx.Node, spec: QuantSpec) -> fx.Node:
            target = _fresh(gm, f"{OBSERVER_PREFIX}{len(parent)}")
            gm.add_submodule(target, make(spec, after.name, after.op == "get_attr"))
            with graph.inserting_after(after):
                obs = graph.call_module(target, (after,))
            parent[obs], spec_of[obs], consumers[obs] = obs, spec, set()
            lin = lineage(after)
            if lin is not None:
                set_record(obs, lin.derived("observer"))
            return obs

        def share(obs: fx.Node, spec: QuantSpec) -> None:
            if spec.shared_with is not None:
                if spec.shared_with in groups:
                    union(obs, groups[spec.shared_with])
                groups.setdefault(spec.shared_with, obs)

        nodes = list(graph.nodes)
        edges = {n: list(n.all_input_nodes) for n in nodes}
        for node in nodes:  # outputs first: edges then reuse them
            ann = get_record(node, QuantAnnotation)
            if ann is None or ann.output is None:
                continue
            obs = new_obs(node, ann.output)
            node.replace_all_uses_with(obs, delete_user_cb=lambda u, o=obs: u is not o)
            out_obs[node] = obs
            consumers[obs].add(_producer_op(node).name)
            share(obs, ann.output)
        for node in nodes:
            ann = get_record(node, QuantAnnotation)
            if ann is None:
                continue
            for idx, spec in ann.inputs:
                prod = edges[node][idx]
                cur = out_obs.get(prod, prod)
                if cur is not prod and _compatible(spec_of[cur], spec) and prod.op != "get_attr":
                    obs = cur
                else:
                    k = (cur, _key(spec))
                    obs = edge_obs.get(k)
                    if obs is None:
                        obs = edge_obs[k] = new_obs(cur, spec)
                    node.replace_input_with(cur, obs)
                consumers[obs].add(node.name)
                share(obs, spec)
        # one module per sharing class: the class root's
        roots = set()
        for obs in list(parent):
            root = find(obs)
            roots.add(root)
            if root is not obs:
                delattr(gm, str(obs.target))
                obs.target = root.target
            gm.get_submodule(root.target).consumers |= consumers[obs]
        count = len(roots)
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(parent), {"observers": len(parent), "modules": count})


def _fresh(gm, name: str) -> str:
    base, i = name, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _factory(cfg):
    if cfg.mode == "qat":
        from .qat import make_fake_quant
        return lambda spec, node, weight: make_fake_quant(spec, node, weight=weight, cfg=cfg)
    from .observers import make_observer
    return lambda spec, node, weight: make_observer(spec, node, weight=weight,
                                                    percentile=cfg.percentile)
