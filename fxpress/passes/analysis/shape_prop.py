"""Shape propagation: refresh ``node.meta["val"]`` (a FakeTensor) on every node.

Rewrites create nodes without metadata; this pass runs the graph under a
FakeTensorMode (no real compute) from the example inputs' shapes and dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                           FakeTensorMode)
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
        except (DynamicOutputShapeException, DataDependentOutputException) as e:
            raise _dynamic_output_error(n, e) from e
        except Exception as e:
            from ...ir.meta import module_path
            first = str(e).splitlines()[0] if str(e) else ""
            raise RuntimeError(f"at node {n.name!r} ({module_path(n)}, {n.target}): "
                               f"{type(e).__name__}: {first}") from e


def _user_line(n: fx.Node) -> str | None:
    """The user's `file:line` (and the line's text) that produced `n`, from its stack trace."""
    import re
    from ...ir.meta import lineage
    rec = lineage(n)
    trace = n.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    if frames:
        f, line, text = frames[-1]
        return f"{f}:{line}: {text.strip()}"
    return getattr(rec, "source", None) or None


def _dynamic_output_error(n: fx.Node, e: Exception):
    """A CaptureError for an op whose output shape depends on the data (nonzero, boolean masks)."""
    from ...errors import CaptureError
    from ...ir.meta import module_path
    inner = str(e).splitlines()[0].strip() if str(e) else str(n.target)
    op = inner if inner.startswith("aten.") else str(n.target)
    what = " (boolean-mask indexing x[mask])" if n.target is torch.ops.aten.index.Tensor else ""
    return CaptureError(
        f"node {n.name!r} ({module_path(n) or '<top>'}, {n.target}){what} has an output whose size "
        f"depends on the input values; the IR needs shapes known from the input shapes. Use a "
        f"fixed-size form instead: torch.where(mask, x, 0), or masked_fill", op=op,
        source=_user_line(n), frontend="fxpress")


@dataclass(frozen=True)
class ShapeProp(Pass):
    """Refresh node.meta['val'] (shapes and dtypes) on every node."""

    name: ClassVar[str] = "shape_prop"
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        propagate_shapes(gm, ctx.example_inputs or None)
        return PassResult(gm, False, {"nodes": len(gm.graph.nodes)})
