"""Rewrite rules as data, with hit counters.

Two kinds of rule:

* ``PatternRule(name, pattern, replacement, match_filter=None)``: `pattern` and
  `replacement` are small Python functions over ``torch.ops.aten`` calls, traced with
  torch.fx and matched with ``torch.fx.subgraph_rewriter`` (Inductor's
  ``fuse_attention.py`` style).
* ``NodeRule(name, targets, fn)``: for each node whose target is in `targets`,
  ``fn(gm, node)`` builds a replacement (an fx.Node) or returns None to decline
  (tinygrad's PatternMatcher).

``apply_rules(gm, rules)`` runs them and returns a Counter of hits per rule name so
tests can assert a rewrite fired.

    def pat(x, w, b):  return torch.ops.aten.relu.default(torch.ops.aten.linear.default(x, w, b))
    def rep(x, w, b):  return torch.ops.aten.clamp_min.default(torch.ops.aten.linear.default(x, w, b), 0.0)
    hits = apply_rules(gm, [PatternRule("relu_as_clamp", pat, rep)])
    assert hits["relu_as_clamp"] == 2
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch.fx as fx
from torch.fx import subgraph_rewriter

from ..ir.meta import lineage, set_record

__all__ = ["PatternRule", "NodeRule", "apply_rules"]


@dataclass(frozen=True)
class PatternRule:
    name: str
    pattern: Callable
    replacement: Callable
    match_filter: Callable | None = None  # (match, original_graph, pattern_graph) -> bool


@dataclass(frozen=True)
class NodeRule:
    name: str
    targets: frozenset
    fn: Callable[[fx.GraphModule, fx.Node], fx.Node | None]

    def __init__(self, name: str, targets: Iterable, fn: Callable):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "targets", frozenset(targets))
        object.__setattr__(self, "fn", fn)


def apply_rules(gm: fx.GraphModule, rules: Sequence[PatternRule | NodeRule]) -> Counter:
    hits: Counter = Counter()
    for rule in rules:
        if isinstance(rule, PatternRule):
            filters = [rule.match_filter] if rule.match_filter else None
            matches = subgraph_rewriter.replace_pattern_with_filters(
                gm, rule.pattern, rule.replacement, match_filters=filters)
            for m in matches:  # new nodes inherit the anchor's lineage
                anchor = m.nodes_map[m.anchor] if hasattr(m, "nodes_map") else None
                lin = lineage(anchor) if isinstance(anchor, fx.Node) else None
                for n in m.replacements:
                    if lin is not None and lineage(n) is None:
                        set_record(n, lin.derived(f"rewrite:{rule.name}"))
            hits[rule.name] += len(matches)
        else:
            for node in list(gm.graph.nodes):
                if node.op == "call_function" and node.target in rule.targets:
                    new = rule.fn(gm, node)
                    if new is None:
                        continue
                    if new is not node:
                        lin = lineage(node)
                        if lin is not None and lineage(new) is None:
                            set_record(new, lin.derived(f"rewrite:{rule.name}"))
                        node.replace_all_uses_with(new)
                        if not node.users:
                            gm.graph.erase_node(node)
                    hits[rule.name] += 1
    if sum(hits.values()):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return hits
