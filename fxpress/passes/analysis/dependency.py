"""Dependency analysis: which channels of which parameters must be removed together.

Every floating-point parameter gets one id per index of each of its dims; op rules
(a table keyed by ATen op) say which ids of a node's inputs, outputs and weights are
the same channel (union) and which may not change size (block). Connected components
of that relation are pruning *units*; units touching the same set of places form a
group, printed in the user's module names:

    >>> dep = analyze(gm)
    >>> print(dep.groups[0])
    conv1.out[0:64] => bn1[0:64] => layer1.0.conv1.in[0:64] (+ add@layer1.0, add@layer1.1)

Per-index tracking makes concat/split offsets, flatten->linear, grouped convs and
attention heads (a reshape of C into (H, D) makes each head one unit) fall out of
the same mechanism. A unit that reaches an op without a rule is blocked and named in
`dep.unresolved`: it is never pruned, so pruning cannot produce a shape error.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch.fx as fx

from ...ir.meta import ChannelGroup, ChannelRef
from ..base import Pass, PassContext, PassResult
from ._dep_builder import Builder
from ._dep_rules import RULES

__all__ = ["analyze", "DependencyGraph", "Group", "Site", "DependencyAnalysis"]


@dataclass
class Site:
    """One dim of one parameter: which unit each of its indices belongs to."""

    target: str          # qualified parameter name
    node: str            # get_attr node name
    dim: int
    comps: np.ndarray    # component label per index along `dim`
    role: str            # out | in | norm | bn | pass
    module: str


@dataclass
class Group:
    """Units (components) that touch the same places; pruning picks units within a group."""

    index: int
    comps: np.ndarray             # component labels, ordered by position in the first site
    sites: list[tuple[int, int]]  # (site index, positions per unit)
    width: int                    # channels per unit at the producing layer (1; D for a head)
    members: tuple[ChannelRef, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.comps)

    @property
    def name(self) -> str:
        """The producing layer's slice, e.g. ``layer1.0.conv1.out[0:64]``."""
        return str(next((m for m in self.members if m.role == "out"), self.members[0]))

    @property
    def key(self) -> str:
        """A name that survives pruning (no slice bounds): ``layer1.0.conv1.out@0``."""
        m = next((m for m in self.members if m.role == "out"), self.members[0])
        return f"{m.module or m.node}.{m.role}@{m.dim}"

    def record(self, pruned: tuple[int, ...] = ()) -> ChannelGroup:
        note = ("+ " + ", ".join(self.notes)) if self.notes else ""
        return ChannelGroup(self.members, self.size, pruned, note)

    def __str__(self) -> str:
        return str(self.record())


@dataclass
class DependencyGraph:
    gm: fx.GraphModule
    sites: list[Site]
    groups: list[Group]
    fixups: list[tuple]                    # (kind, node, payload with label arrays)
    unprunable: dict[str, list[str]] = field(default_factory=dict)  # reason -> group descriptions
    unresolved: list[str] = field(default_factory=list)             # couplings with no rule
    num_comps: int = 0

    def __str__(self) -> str:
        lines = [f"{len(self.groups)} prunable groups"]
        lines += [f"  [{g.index}] {g}" for g in self.groups]
        for why, descs in self.unprunable.items():
            lines.append(f"  kept ({why}): " + "; ".join(d.split(" => ")[0] for d in descs))
        lines += [f"  unresolved: {u}" for u in self.unresolved]
        return "\n".join(lines)


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def analyze(gm: fx.GraphModule, *, exclude: tuple[str, ...] = ()) -> DependencyGraph:
    """Build the channel dependency groups of `gm` (needs node.meta['val'] shapes)."""
    if any(n.op != "output" and "val" not in n.meta for n in gm.graph.nodes
           if n.op in ("placeholder", "call_function")):
        from .shape_prop import propagate_shapes
        propagate_shapes(gm)
    b = Builder(gm)
    for n in gm.graph.nodes:
        b.visit(n, RULES)
    labels = b.components()
    blocked_reason = b.blocked_by_component(labels)

    # sites: every parameter dim whose ids were touched by a rule
    sites: list[Site] = []
    for node, ids in b.param_ids.items():
        for d, arr in enumerate(ids):
            if arr is None:
                continue
            role = b.roles.get((node.target, d), "pass")
            sites.append(Site(str(node.target), node.name, d, labels[arr], role, _owner(str(node.target))))

    ncomp = int(labels.max()) + 1 if labels.size else 0
    anchored = np.zeros(ncomp, dtype=bool)
    for s in sites:
        if s.role == "out":
            anchored[s.comps] = True
    for pat in exclude:
        for s in sites:
            if fnmatch.fnmatch(s.module, pat) or s.module == pat or s.module.startswith(pat + "."):
                for c in np.unique(s.comps):
                    blocked_reason.setdefault(int(c), f"excluded: {pat}")

    # group components by the sites they touch
    sig: dict[int, list] = {}
    first_pos: dict[int, int] = {}
    for si, s in enumerate(sites):
        u, first, cnt = np.unique(s.comps, return_index=True, return_counts=True)
        for c, f, k in zip(u.tolist(), first.tolist(), cnt.tolist()):
            sig.setdefault(c, []).append((si, k))
            first_pos.setdefault(c, f)
    by_sig: dict[tuple, list[int]] = {}
    for c, s in sig.items():
        by_sig.setdefault(tuple(s), []).append(c)

    notes_of = b.notes_by_component(labels)
    groups: list[Group] = []
    unprunable: dict[str, list[str]] = {}
    for key, comps in by_sig.items():
        comps.sort(key=lambda c: first_pos[c])
        g = Group(-1, np.asarray(comps, dtype=np.int64), list(key), 1)
        g.width = next((k for si, k in key if sites[si].role == "out"), 1)
        g.members = _members(g, sites)
        g.notes = tuple(sorted({x for c in comps[:1] for x in notes_of.get(c, ())}))[:4]
        reason = next((blocked_reason[c] for c in comps if c in blocked_reason), None)
        if not anchored[g.comps].all():
            continue  # kernel dims, embedding rows, ...: not channels of any layer
        if reason is not None:
            key = reason if reason.startswith("unresolved") else reason.split(" at ")[0]
            unprunable.setdefault(key, []).append(str(g))
            continue
        g.index = len(groups)
        groups.append(g)
    fixups = [(kind, node, b.relabel(payload, labels)) for kind, node, payload in b.fixups]
    return DependencyGraph(gm, sites, groups, fixups, unprunable, sorted(set(b.unresolved)), ncomp)


def _members(g: Group, sites: list[Site]) -> tuple[ChannelRef, ...]:
    """One ChannelRef per (module, role), in graph order; biases/running stats folded in."""
    refs, seen = [], set()
    compset = set(g.comps.tolist())
    for si, per_unit in g.sites:
        s = sites[si]
        key = (s.module, s.role if s.role != "bn" else "norm")
        if key in seen:
            continue
        seen.add(key)
        pos = np.flatnonzero(np.isin(s.comps, list(compset)))
        start, stop = int(pos.min()), int(pos.max()) + 1
        contiguous = stop - start == len(pos)
        role = "norm" if s.role == "bn" else s.role
        refs.append(ChannelRef(s.node, s.module, s.dim, start, stop, role,
                               per_unit if contiguous else 0))
    return tuple(refs)


@dataclass(frozen=True)
class DependencyAnalysis(Pass):
    """Compute channel groups and report them (analysis only; the graph is unchanged)."""

    name: ClassVar[str] = "dependency"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    exclude: tuple[str, ...] = ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        dep = analyze(gm, exclude=tuple(self.exclude))
        ctx.report["dependency"] = str(dep)
        return PassResult(gm, False, {"groups": len(dep.groups), "unresolved": dep.unresolved,
                                      "kept": {k: len(v) for k, v in dep.unprunable.items()}})
