"""Shape propagation: refresh ``node.meta["val"]`` (a FakeTensor) on every node.

Rewrites create nodes without metadata; this pass runs the graph under a
FakeTensorMode (no real compute) from the example inputs' shapes and dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..base import Pass, PassContext, PassResult

__all__ = ["ShapeProp", "propagate_shapes", "placeholder_examples"]


def placeholder_examples(gm: fx.GraphModule) -> list:
    """Inputs shaped like the graph's placeholders' recorded values (zeros)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                out.append(torch.zeros([_hint(d) for d in v.shape], dtype=v.dtype))
            else:
                out.append(v)
    return out


def _hint(d) -> int:
    """A dim's size: symbolic dims (a dynamic batch) take the size export saw."""
    if isinstance(d, torch.SymInt):
        node = d.node
        return int(node.hint) if getattr(node, "hint", None) is not None else 2
    return int(d)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence | None = None) -> fx.GraphModule:
    """Set meta["val"] on every node by fake-running `gm` on inputs shaped like `example_inputs`."""
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    inputs = torch.utils._pytree.tree_leaves(tuple(example_inputs)) if example_inputs else []
    if len(inputs) != n_ph:
        inputs = placeholder_examples(gm)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with mode:
        _NamingProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    return gm


class _NamingProp(FakeTensorProp):
    """FakeTensorProp whose errors name the node and user module that failed."""

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except Exception as e:
            from ...ir.meta import module_path
            first = str(e).splitlines()[0] if str(e) else ""
            raise RuntimeError(f"at node {n.name!r} ({module_path(n)}, {n.target}): "
                               f"{type(e).__name__}: {first}") from e


@dataclass(frozen=True)
class ShapeProp(Pass):
    """Refresh node.meta['val'] (shapes and dtypes) on every node."""

    name: ClassVar[str] = "shape_prop"
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        propagate_shapes(gm, ctx.example_inputs or None)
        return PassResult(gm, False, {"nodes": len(gm.graph.nodes)})
