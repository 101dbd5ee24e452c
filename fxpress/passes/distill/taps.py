"""Taps: a graph transform that turns intermediate nodes into extra graph outputs.

Distillation needs intermediate features (FitNets hints, attention maps, the inputs
of auxiliary heads). Forward hooks do not survive ``torch.compile`` graph capture or
module replication, so a tap is an *output*: ``tap(gm, ["layer1", "layer2.0.conv1"])``
returns a new GraphModule that shares every parameter with `gm` and returns
``(original_outputs, {"layer1": tensor, "layer2.0.conv1": tensor})``. Training the
tapped module trains `gm` in place; dropping the tapped module drops the taps.

    tapped = tap(gm, ["features.3"])
    logits, feats = tapped(x)
    feats["features.3"].shape      # the output of module features.3
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from ...errors import RecipeError
from ...ir.meta import lineage

__all__ = ["ensure_graph", "resolve_tap", "runner", "tap", "tap_candidates", "view"]


def _is_float_value(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    return val is None  # no shape info (fresh rewrite): let it through


def _module_nodes(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_module"):
            continue
        lin = lineage(n)
        mp = lin.module_path if lin else ""
        if mp == path or mp.startswith(path + "."):
            out.append(n)
    return out


def resolve_tap(gm: fx.GraphModule, point: str) -> fx.Node:
    """The node a tap point names: an fx node name, else the output of a user module path.

    A module's output is the last floating-point node (in graph order) whose lineage lies
    in that module: for ``conv1`` the conv, for a block the block's last op. Integer
    nodes (``quantize_per_tensor`` results) are skipped so a tap on a quantized graph sees
    the dequantized activation.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    if point in by_name and by_name[point].op not in ("output", "get_attr"):
        return by_name[point]
    for n in gm.graph.nodes:  # symbolically traced graphs keep modules as call_module nodes
        if n.op == "call_module" and n.target == point:
            return n
    nodes = [n for n in _module_nodes(gm, point) if _is_float_value(n)]
    if not nodes:
        raise RecipeError(f"tap point {point!r} names no node and no module of the graph",
                          field="taps", value=point, accepted=tap_candidates(gm)[:40])
    last = nodes[-1]
    # a dequantize that follows the module's quantized output belongs to the same activation
    users = [u for u in last.users if u.op == "call_function"]
    if len(users) == 1 and "quantize_per_tensor" in str(users[0].target):
        q = users[0]
        dq = [u for u in q.users if "dequantize" in str(u.target)]
        if len(dq) == 1:
            return dq[0]
    return last


def tap_candidates(gm: fx.GraphModule) -> list[str]:
    """Module paths that have at least one compute node (what `resolve_tap` accepts)."""
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        lin = lineage(n)
        if lin and lin.module_path:
            seen.setdefault(lin.module_path, None)
    return list(seen)


def ensure_graph(module: torch.nn.Module, example_inputs: Sequence | None) -> fx.GraphModule:
    """`module` as a GraphModule whose parameters ARE the module's (no copy).

    A GraphModule is returned as is. An eager module is exported (torch.export shares
    parameters with the module it exports), in its current train/eval mode, so training
    the graph trains the module.
    """
    inner = getattr(module, "graph_module", None)  # CompressedModel
    if isinstance(inner, fx.GraphModule):
        return inner
    if isinstance(module, fx.GraphModule):
        return module
    if not example_inputs:
        raise RecipeError("tapping an eager module needs example inputs to export it",
                          field="example_inputs", value=None)
    from ...frontends.common import annotate_lineage, remove_guards
    ep = torch.export.export(module, tuple(example_inputs), strict=False)
    gm = ep.module()
    remove_guards(gm)
    annotate_lineage(gm)
    gm.recompile()
    return gm


def view(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule running `gm`'s graph on `gm`'s own parameters, without its hooks.

    ``ExportedProgram.module()`` installs a pre-hook that insists on the example batch
    size; training data comes in other batch sizes (the last batch of an epoch), and
    the ATen graph itself is fine with them wherever no shape was baked in.
    """
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__.replace("Impl", ""))


def tap(gm: fx.GraphModule, points: Iterable[str]) -> fx.GraphModule:
    """A GraphModule sharing `gm`'s parameters that also returns the tapped values.

    Output: ``(original_output_structure, {point: tensor})``. `gm` is not modified.
    """
    points = list(dict.fromkeys(points))
    if not points:
        raise RecipeError("tap() needs at least one tap point", field="taps", value=points)
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    # graph_copy copies every node but the output and returns the output's value
    old_out = graph.graph_copy(gm.graph, val_map)
    targets = {p: val_map[resolve_tap(gm, p)] for p in points}

    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None \
            and codegen.pytree_info.out_spec is not None:
        info = codegen.pytree_info
        flat = list(old_out) if isinstance(old_out, (tuple, list)) else [old_out]
        skeleton = pytree.tree_unflatten(list(range(len(flat))), info.out_spec)
        _, out_spec = pytree.tree_flatten((skeleton, {p: -1 for p in points}))
        graph.output(tuple(flat) + tuple(targets[p] for p in points))
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, out_spec))
    else:
        graph.output((old_out, dict(targets)))
        graph._codegen = gm.graph._codegen
    # GraphModule(root, graph) copies the attributes get_attr reads *by reference*:
    # the tapped module owns no tensors of its own.
    tapped = fx.GraphModule(gm, graph, class_name="Tapped" + type(gm).__name__.replace("Impl", ""))
    tapped.meta["fxpress_taps"] = tuple(points)
    return tapped


def runner(module: torch.nn.Module) -> torch.nn.Module:
    """What a trainer calls: a hook-free view of a graph module, an eager module as is."""
    inner = getattr(module, "graph_module", None)
    if isinstance(inner, fx.GraphModule):
        return view(inner)
    if isinstance(module, fx.GraphModule):
        return view(module)
    return module
