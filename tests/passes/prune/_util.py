"""Helpers for the pruning tests: prune a captured graph and check it against a zeroed original."""
from __future__ import annotations

import copy

import numpy as np
import torch

from fxpress.passes.analysis.dependency import analyze
from fxpress.passes.analysis.shape_prop import propagate_shapes
from fxpress.passes.prune.channel_removal import remove_channels, set_tensor
from fxpress.passes.prune.importance import choose_units, unit_scores

_EXACT_BLOCKERS = ("layer_norm", "group_norm")


def plan_and_prune(gm, inputs, ratio, importance="l2", scope="global", round_to=1):
    """Prune `gm` in place; return (dependency graph before, bool mask of removed units)."""
    dep = analyze(gm)
    scores = unit_scores(gm, dep, importance)
    plan = choose_units(dep, scores, ratio=ratio, scope=scope, round_to=round_to)
    pruned = np.zeros(dep.num_comps, dtype=bool)
    for comps in plan.values():
        pruned[comps] = True
    remove_channels(gm, dep, pruned)
    propagate_shapes(gm, inputs)
    return dep, pruned


def zeroed_copy(gm, dep, pruned):
    """A copy of the unpruned `gm` whose removed units' parameter slices are all zero.

    For a graph without reductions over channels (norms over C, softmax over C) the
    zeroed channels contribute nothing, so it must compute what the pruned graph does:
    a pruned graph that slices a coupled tensor inconsistently fails this comparison.
    """
    z = copy.deepcopy(gm)
    with torch.no_grad():
        for s in dep.sites:
            idx = np.flatnonzero(pruned[s.comps])
            if len(idx) == 0:
                continue
            obj = z
            for p in s.target.split("."):
                obj = getattr(obj, p)
            t = obj.detach().clone()
            if s.role == "norm" and "running_var" in s.target:
                continue  # keep var > 0; gamma = beta = 0 already zeroes the channel
            t.index_fill_(s.dim, torch.as_tensor(idx), 0.0)
            set_tensor(z, s.target, t)
    return z


def reduces_over_channels(gm) -> bool:
    return any(n.op == "call_function" and any(k in str(n.target) for k in _EXACT_BLOCKERS)
               for n in gm.graph.nodes)
