"""Unit importance and the choice of units to remove (local or global ranking).

Scores are summed over every parameter slice a unit owns (the producing layer's
rows, the consumers' columns, norm scales), as Torch-Pruning's group importance
does, then divided by the group mean so that groups of different sizes compare
in a global ranking.

    scores = unit_scores(gm, dep, "l2")
    pruned = choose_units(dep, scores, ratio=0.5, scope="global", round_to=8)
"""
from __future__ import annotations

import fnmatch
import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.fx as fx

from ...errors import CalibrationError
from ...utils import iter_batches
from ..analysis.dependency import DependencyGraph, Group

__all__ = ["IMPORTANCES", "unit_scores", "taylor_grads", "choose_units", "units_to_remove"]

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "random")
_WEIGHT_ROLES = ("out", "in", "bn")


def _fetch(gm, target):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _per_index(t: torch.Tensor, dim: int, fn: Callable) -> np.ndarray:
    x = fn(t.detach().float()).movedim(dim, 0).reshape(t.shape[dim], -1)
    return x.sum(1).cpu().numpy().astype(np.float64)


def taylor_grads(gm: fx.GraphModule, batches: Iterable | None, example_inputs: tuple,
                 max_batches: int = 4, loss_fn: Callable | None = None) -> dict[str, torch.Tensor]:
    """Accumulated |w * dL/dw| per parameter over a few batches (first-order Taylor).

    Without labels the loss is the output energy (mean of squares): the score then
    measures how much a channel moves the model's outputs.
    """
    loss_fn = loss_fn or (lambda out: sum(o.float().pow(2).mean() for o in
                                         torch.utils._pytree.tree_leaves(out)
                                         if isinstance(o, torch.Tensor) and o.is_floating_point()))
    params = dict(gm.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    flags = {k: p.requires_grad for k, p in params.items()}
    batches = list(iter_batches(batches))[:max_batches] or [example_inputs]
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            gm.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(gm(*batch))
                if not isinstance(loss, torch.Tensor) or not torch.isfinite(loss):
                    raise CalibrationError(f"taylor importance: loss is {loss!r} on a calibration batch")
                loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    acc[k] += (p.detach() * p.grad).abs()
    finally:
        for k, p in params.items():
            p.grad = None
            p.requires_grad_(flags[k])
    return acc


def unit_scores(gm: fx.GraphModule, dep: DependencyGraph, importance: str, *,
                grads: dict[str, torch.Tensor] | None = None, seed: int = 0) -> np.ndarray:
    """Raw importance per component (unit); groups without a BN scale fall back to L1 for bn_scale."""
    scores = np.zeros(dep.num_comps, dtype=np.float64)
    if importance == "random":
        return np.random.default_rng(seed).random(dep.num_comps)
    has_bn = np.zeros(dep.num_comps, dtype=bool)
    l1 = np.zeros(dep.num_comps, dtype=np.float64)
    for s in dep.sites:
        if s.role not in _WEIGHT_ROLES or s.role == "bn" and not s.target.endswith("weight"):
            continue
        t = _fetch(gm, s.target)
        if importance in ("l1", "bn_scale"):
            v = _per_index(t, s.dim, torch.abs)
            np.add.at(l1, s.comps, v)
            if s.role == "bn":
                np.add.at(scores, s.comps, v)
                has_bn[s.comps] = True
        elif importance == "l2":
            np.add.at(scores, s.comps, _per_index(t, s.dim, torch.square))
        elif importance == "taylor":
            g = (grads or {}).get(s.target)
            if g is not None:
                np.add.at(scores, s.comps, _per_index(g, s.dim, lambda x: x))
    if importance == "l1":
        return l1
    if importance == "bn_scale":
        return np.where(has_bn, scores, l1)
    return scores


def _cap_for(g: Group, caps: dict[str, float] | None, max_ratio: float) -> float:
    cap = max_ratio
    for pat, r in (caps or {}).items():
        if any(fnmatch.fnmatch(m.module, pat) or m.module == pat for m in g.members if m.role == "out"):
            cap = min(cap, r)
    return cap


def units_to_remove(size: int, wanted: int, width: int, round_to: int, min_keep: int = 1,
                    mode: str = "down") -> int:
    """How many of `size` units to remove so the kept channels are a multiple of `round_to`.

    mode "down" rounds the kept count down to the multiple (as Torch-Pruning does), "up"
    rounds it up, "nearest" to the closer one; never below `min_keep` (the ratio cap) and
    never to zero.
    """
    step = round_to // math.gcd(round_to, width) if round_to > 1 else 1
    keep = size - max(0, min(wanted, size))
    rnd = {"down": math.floor, "up": math.ceil, "nearest": lambda v: math.floor(v + 0.5)}[mode]
    keep = rnd(keep / step) * step
    if keep < min_keep:
        keep = math.ceil(min_keep / step) * step
    keep = min(size, max(keep, step, 1))
    return size - keep


def choose_units(dep: DependencyGraph, scores: np.ndarray, *, ratio: float, scope: str,
                 round_to: int = 1, max_ratio: float = 0.9,
                 caps: dict[str, float] | None = None,
                 base_sizes: dict[str, int] | None = None,
                 round_mode: str = "down") -> dict[int, np.ndarray]:
    """Units to remove per group index: the lowest-scoring, `ratio` of all units (global) or of each group.

    With `base_sizes` (group key -> size before the first step of a schedule) `ratio` is
    cumulative: each group ends at (1 - ratio) of its original size, without rounding drift.
    """
    base = {g.index: (base_sizes or {}).get(g.key, g.size) for g in dep.groups}
    norm = {}
    for g in dep.groups:
        s = scores[g.comps]
        m = s.mean()
        norm[g.index] = s / m if m > 0 else s
    wanted: dict[int, int] = {}
    if scope == "global" and dep.groups:
        allv = np.concatenate([norm[g.index] for g in dep.groups])
        k = len(allv) - int(math.ceil((1 - ratio) * sum(base.values()) - 1e-9))
        thr = np.partition(allv, k - 1)[k - 1] if k > 0 else -np.inf
        for g in dep.groups:
            wanted[g.index] = int((norm[g.index] <= thr).sum()) if k > 0 else 0
    else:
        for g in dep.groups:
            wanted[g.index] = g.size - int(math.ceil((1 - ratio) * base[g.index] - 1e-9))
    plan = {}
    for g in dep.groups:
        cap = _cap_for(g, caps, max_ratio)
        # the cap and rounding are about the original size: keep >= (1 - cap) of it
        floor_keep = int(math.ceil((1 - cap) * base[g.index] - 1e-9))
        n = units_to_remove(g.size, wanted[g.index], g.width, round_to, max(floor_keep, 1), round_mode)
        if n > 0:
            plan[g.index] = g.comps[np.argsort(norm[g.index], kind="stable")[:n]]
    return plan
