"""Pruning schedules and the pass that drives them: analyse, score, remove, fine-tune, repeat.

One-shot removes `ratio` of the units at once; iterative reaches it in `steps`
steps along a linear or cubic curve (cubic removes most early, as in Zhu & Gupta's
gradual pruning), calling `ctx.finetune(gm)` after every step. Under a process group (fxpress.distributed)
rank 0 decides each step's channels and broadcasts them, so every rank removes the same
ones even though their calibration shards (Taylor scores) and timings differ.

    >>> step_ratios(0.5, 4, "linear")
    [0.125, 0.25, 0.375, 0.5]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx

from ... import distributed
from ...errors import FxpressError
from ...ir.meta import set_record
from ..analysis.cost import total_cost
from ..analysis.dependency import analyze
from ..analysis.shape_prop import propagate_shapes
from ..base import Pass, PassContext, PassResult
from .channel_removal import remove_channels
from .importance import choose_units, taylor_grads, unit_scores

__all__ = ["step_ratios", "PruneChannels"]


def step_ratios(ratio: float, steps: int, curve: str = "linear") -> list[float]:
    """Cumulative fraction of units removed after each step."""
    out = []
    for i in range(1, steps + 1):
        f = i / steps
        out.append(ratio * (f if curve == "linear" else 1 - (1 - f) ** 3))
    return out


def _out_shapes(gm: fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return [tuple(x.meta["val"].shape) if isinstance(x, fx.Node) and "val" in x.meta else None
            for x in torch.utils._pytree.tree_leaves(out.args)]


@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove whole channel groups (structured pruning) by the config's schedule and importance."""

    name: ClassVar[str] = "prune_channels"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        c = self.config
        before = total_cost(gm)
        shapes0 = _out_shapes(gm)
        removed: dict[str, int] = {}
        prunable = 0
        speed_rows: list[dict] = []
        dep, base_sizes = None, None
        for step, target in enumerate(step_ratios(c.ratio, c.steps, c.curve)):
            dep = analyze(gm, exclude=tuple(c.exclude))
            if base_sizes is None:  # targets are cumulative, relative to the unpruned groups
                base_sizes = {g.key: g.size for g in dep.groups}
                prunable = _prunable_params(gm, dep)
            w = distributed.world()
            plan, rows = self._plan(gm, ctx, dep, step, target, base_sizes) \
                if w is None or w.rank == 0 else (None, None)
            if w is not None:
                plan, rows = distributed.broadcast((plan, rows), w)
            speed_rows += rows
            pruned = np.zeros(dep.num_comps, dtype=bool)
            for gidx, comps in plan.items():
                pruned[comps] = True
                g = dep.groups[gidx]
                key = g.name
                removed[key] = removed.get(key, 0) + int(len(comps) * g.width)
                pos = {int(x): i for i, x in enumerate(g.comps)}
                node = next(n for n in gm.graph.nodes if n.name == dep.sites[g.sites[0][0]].node)
                set_record(node, g.record(tuple(sorted(pos[int(x)] for x in comps))))
            remove_channels(gm, dep, pruned)
            propagate_shapes(gm, ctx.example_inputs or None)
            if ctx.finetune is not None:
                ctx.finetune(gm)
        if _out_shapes(gm) != shapes0:  # the analysis guarantees this; a failure is our bug
            raise FxpressError(f"channel pruning changed output shapes {shapes0} -> {_out_shapes(gm)}")
        after = total_cost(gm)
        final = analyze(gm, exclude=tuple(c.exclude))
        ctx.report["channel_pruning"] = _section(removed, dep, final, speed_rows, c, base_sizes)
        stats = {"macs_before": before.macs, "macs_after": after.macs,
                 "params_before": before.params, "params_after": after.params,
                 "prunable_params": prunable,
                 "channels_removed": sum(removed.values()), "groups_pruned": len(removed),
                 "steps": c.steps, "unresolved": dep.unresolved if dep else [],
                 "kept": {k: len(v) for k, v in (dep.unprunable if dep else {}).items()}}
        if speed_rows:
            stats["speed_rollbacks"] = sum(1 for r in speed_rows if not r["kept"])
        return PassResult(gm, bool(removed), stats)

    def _plan(self, gm, ctx, dep, step, target, base_sizes) -> tuple[dict, list[dict]]:
        """One step's decision: {group index: unit indices} and the speed checks behind it."""
        c = self.config
        grads = None
        if c.importance == "taylor":
            grads = taylor_grads(gm, ctx.calibration, ctx.example_inputs, c.taylor_batches)
        scores = unit_scores(gm, dep, c.importance, grads=grads, seed=c.seed + step)
        plan = choose_units(dep, scores, ratio=target, scope=c.scope, round_to=c.round_to,
                            max_ratio=c.max_ratio, caps=c.caps, base_sizes=base_sizes,
                            round_mode=c.round_mode)
        rows: list[dict] = []
        if c.verify_speed and plan:
            from .speed import check_speed
            plan, rows = check_speed(gm, dep, plan, example_inputs=ctx.example_inputs,
                                     backend=c.speed_backend)
        return plan, rows


def _why_whole(g, c, base: int) -> str:
    """Why a prunable group lost nothing: rounding, the cap, or the importance threshold."""
    channels = base * g.width
    share = c.ratio if c.scope == "local" else c.ratio
    if int(share * base) == 0 or int(share * channels) // max(c.round_to, 1) * max(c.round_to, 1) == 0 \
            or g.width > share * channels:
        return (f"{share:.0%} of {base} unit(s) of {g.width} channel(s) rounds to 0 "
                f"at round_to={c.round_to}")
    if c.scope == "global":
        return "its channels score above the global importance threshold"
    return f"capped (max_ratio={c.max_ratio})"


def _prunable_params(gm: fx.GraphModule, dep) -> int:
    """Parameters with at least one dim in a prunable group (what pruning may shrink)."""
    from ..analysis.cost import _fetch_attr
    targets = {dep.sites[si].target for g in dep.groups for si, _ in g.sites}
    return sum(t.numel() for t in (_fetch_attr(gm, x) for x in targets) if t is not None)


def _section(removed: dict[str, int], dep, final, speed_rows, c=None, base_sizes=None) -> str:
    lines = ["removed channels per group (producing layer):"]
    lines += [f"  {k}: -{v}" for k, v in removed.items()]
    if dep is not None and c is not None:
        for g in dep.groups:
            if g.name not in removed:
                lines.append(f"not pruned ({_why_whole(g, c, (base_sizes or {}).get(g.key, g.size))}): "
                             f"{g.name}")
    if dep is not None:
        for why, descs in dep.unprunable.items():
            lines.append(f"kept whole ({why}): " + "; ".join(d.split(" => ")[0] for d in descs))
        lines += [f"unresolved coupling (kept whole): {u}" for u in dep.unresolved]
    for r in speed_rows:
        lines.append(f"speed {r['group']}: {r['before_ms']:.3f} ms -> {r['after_ms']:.3f} ms "
                     f"{'kept' if r['kept'] else 'rolled back'}")
    lines.append(f"groups after pruning: {len(final.groups)}")
    return "\n".join(lines)
