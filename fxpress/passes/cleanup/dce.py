"""Dead-code elimination: drop nodes whose values nobody uses, then the parameters they read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from ...registry import recipe_entry
from ..base import Pass, PassContext, PassResult

__all__ = ["DeadCodeElimination", "remove_unused_attributes"]


def remove_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters/buffers no get_attr reads, and submodules left empty. Returns the count."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            if any(c == owner or owner.startswith(c + ".") for c in called if owner):
                continue  # read by a call_module node, not via get_attr
            delattr(mod, attr)
            removed += 1
    gm.delete_all_unused_submodules()
    return removed


@recipe_entry
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove unused nodes and the parameters only they read."""

    name: ClassVar[str] = "dce"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        before = len(gm.graph.nodes)
        changed = gm.graph.eliminate_dead_code()
        attrs = remove_unused_attributes(gm)
        gm.recompile()
        return PassResult(gm, bool(changed or attrs),
                          {"nodes_removed": before - len(gm.graph.nodes), "attrs_removed": attrs})
