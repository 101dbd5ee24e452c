"""Magnitude sparsity: zero the smallest weights of conv/linear layers and record the mask.

Unstructured masks keep the largest |w| per layer (local) or over all layers (global);
2:4 masks keep the 2 largest of every 4 consecutive weights along the input dim, the
pattern sparse tensor cores run. Each layer node gets a SparsityMask record.

    >>> mask_2_4(torch.tensor([[0.1, -3., 2., 0.5]]))
    tensor([[False,  True,  True, False]])
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...ir.meta import SparsityMask, module_path, set_record
from ..base import Pass, PassContext, PassResult
from .channel_removal import set_tensor

__all__ = ["SparsifyWeights", "mask_2_4", "mask_unstructured", "sparsifiable_layers"]

aten = torch.ops.aten
_LAYERS = {aten.linear.default: 1, aten.conv1d.default: 1, aten.conv2d.default: 1,
           aten.conv3d.default: 1}


def _fetch(gm, target):
    obj = gm
    for p in str(target).split("."):
        obj = getattr(obj, p)
    return obj


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of each group of 4 along the flattened input dim (needs in % 4 == 0)."""
    flat = w.detach().reshape(w.shape[0], -1)
    if flat.shape[1] % 4:
        raise ValueError(f"2:4 needs the input size to be a multiple of 4, got {flat.shape[1]}")
    g = flat.abs().reshape(-1, 4)
    top = g.topk(2, dim=1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(1, top, True)
    return m.reshape(w.shape)


def mask_unstructured(w: torch.Tensor, threshold: float) -> torch.Tensor:
    return w.detach().abs() > threshold


def _kth(values: torch.Tensor, sparsity: float) -> float:
    k = int(sparsity * values.numel())
    if k <= 0:
        return -1.0
    return float(values.float().kthvalue(k).values)


def sparsifiable_layers(gm: fx.GraphModule, exclude=(), min_params: int = 0) -> list[tuple[fx.Node, str]]:
    """(layer node, weight target) for every conv/linear whose weight is a parameter."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _LAYERS:
            continue
        w = n.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        mod = module_path(n)
        if any(fnmatch.fnmatch(mod, p) or mod == p or mod.startswith(p + ".") for p in exclude):
            continue
        if _fetch(gm, w.target).numel() < min_params:
            continue
        out.append((n, str(w.target)))
    return out


@dataclass(frozen=True)
class SparsifyWeights(Pass):
    """Zero the smallest-magnitude weights of conv/linear layers and attach SparsityMask records."""

    name: ClassVar[str] = "sparsify_weights"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c = self.config
        layers = sparsifiable_layers(gm, c.exclude, c.min_params)
        skipped, per_layer = [], {}
        thr = None
        if c.pattern == "unstructured" and c.scope == "global" and layers:
            allw = torch.cat([_fetch(gm, t).detach().abs().reshape(-1) for _, t in layers])
            thr = _kth(allw, c.sparsity)
        zeros = total = 0
        for node, target in layers:
            w = _fetch(gm, target)
            if c.pattern == "2:4":
                try:
                    mask = mask_2_4(w)
                except ValueError as e:
                    skipped.append(f"{module_path(node)}: {e}")
                    continue
            else:
                t = thr if thr is not None else _kth(w.detach().abs().reshape(-1), c.sparsity)
                mask = mask_unstructured(w, t)
            with torch.no_grad():
                set_tensor(gm, target, w * mask)
            set_record(node, SparsityMask(c.pattern, target, mask))
            per_layer[module_path(node)] = round(1 - float(mask.float().mean()), 4)
            zeros += int((~mask).sum())
            total += mask.numel()
        if layers:
            gm.recompile()
        return PassResult(gm, bool(per_layer), {
            "pattern": c.pattern, "layers": len(per_layer), "sparsity": zeros / total if total else 0.0,
            "per_layer": per_layer, "skipped": skipped})
