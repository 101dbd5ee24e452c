"""Physical channel removal: slice parameters and rewrite shape constants for chosen units.

Given a DependencyGraph and the units (components) to remove, every parameter dim
that holds them is index-selected, and every shape constant that counts them is
recomputed (view/reshape/expand sizes, split sizes, slice bounds, select indices,
layer_norm shapes, depthwise conv groups). The result is a smaller *dense* graph.

    dep = analyze(gm)
    pruned = np.zeros(dep.num_comps, bool); pruned[dep.groups[0].comps[:8]] = True
    remove_channels(gm, dep, pruned)
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..analysis.dependency import DependencyGraph

__all__ = ["remove_channels", "set_tensor"]

aten = torch.ops.aten


def _fetch(gm, target: str):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer in place of its owner, keeping its kind and requires_grad."""
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    old = getattr(mod, attr)
    if isinstance(old, torch.nn.Parameter):
        mod.register_parameter(attr, torch.nn.Parameter(value.detach().clone(), old.requires_grad))
    elif attr in getattr(mod, "_buffers", {}):
        mod.register_buffer(attr, value.detach().clone())
    else:
        setattr(mod, attr, value.detach().clone())


def _count(labels: np.ndarray, alive: np.ndarray) -> int:
    return int(((labels < 0) | alive[np.maximum(labels, 0)]).sum())


def remove_channels(gm: fx.GraphModule, dep: DependencyGraph, pruned: np.ndarray) -> dict:
    """Remove the units flagged in `pruned` (bool per component) from `gm`, in place."""
    alive = ~pruned
    keep: dict[str, dict[int, np.ndarray]] = {}
    for s in dep.sites:
        k = (s.comps < 0) | alive[np.maximum(s.comps, 0)]
        if not k.all():
            keep.setdefault(s.target, {})[s.dim] = np.flatnonzero(k)
    params_before = params_after = 0
    with torch.no_grad():
        for target, dims in keep.items():
            t = _fetch(gm, target)
            params_before += t.numel()
            for d, idx in dims.items():
                t = t.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
            params_after += t.numel()
            set_tensor(gm, target, t.contiguous())
    rewritten = 0
    for kind, node, payload in dep.fixups:
        if _fix(node, kind, payload, alive):
            rewritten += 1
    gm.recompile()
    return {"params_sliced": len(keep), "params_removed": params_before - params_after,
            "constants_rewritten": rewritten}


def _fix(node: fx.Node, kind: str, payload, alive: np.ndarray) -> bool:
    args = list(node.args)
    if kind in ("view", "unflatten"):
        pos = 1 if kind == "view" else 2
        sizes = list(args[pos])
        if kind == "view":
            arrs = payload
        else:  # unflatten(x, dim, sizes): the new dims start at `dim` of the input
            d = args[1] if args[1] >= 0 else args[1] + len(payload) - len(sizes) + 1
            arrs = payload[d:d + len(sizes)]
        changed = False
        for i, a in enumerate(arrs):
            if a is None or not isinstance(sizes[i], int) or sizes[i] == -1:
                continue
            new = _count(a, alive)
            changed |= new != sizes[i]
            sizes[i] = new
        args[pos] = sizes
        node.args = tuple(args)
        return changed
    if kind == "split":
        dim, pieces = payload
        sizes = [_count(p, alive) for p in pieces]
        node.target = aten.split_with_sizes.default
        node.args = (args[0], sizes, dim)
        node.kwargs = {}
        return True
    if kind == "slice":
        arr, start, end = payload
        ns = _count(arr[:start], alive)
        ne = ns + _count(arr[start:end], alive)
        while len(args) < 4:
            args.append(None)
        args[2], args[3] = ns, ne
        node.args = tuple(args)
        return (ns, ne) != (start, end)
    if kind == "select":
        idx = args[2] % len(payload)
        args[2] = _count(payload[:idx], alive)
        node.args = tuple(args)
        return True
    if kind == "layer_norm":
        args[1] = [_count(payload[0], alive)]
        node.args = tuple(args)
        return True
    if kind == "conv_groups":
        gidx, arr, per = payload
        groups = _count(arr, alive) // per
        while len(args) <= gidx:
            args.append(_CONV_DEFAULTS[len(args)])
        changed = args[gidx] != groups
        args[gidx] = groups
        node.args = tuple(args)
        return changed
    raise ValueError(f"unknown fixup kind {kind!r}")


# conv2d(x, w, b, stride, padding, dilation, groups) defaults, for filling positional args
_CONV_DEFAULTS = [None, None, None, [1], [0], [1], 1]
