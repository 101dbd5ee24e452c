"""The machinery every factorization pass shares: a `Chain` of small real ops that replaces one node.

A method (svd, tucker, cp, tt) only decides *what* the factors are; this module turns
its Chain into graph nodes (new get_attr params on the owning submodule, lineage and
Factorization records), runs the same Chain eagerly to time it (verify_speed), and
drives the per-node loop with its skip reasons and report.

    chain = Chain(params={"lowrank_v": A, "lowrank_u": B},
                  steps=[Step(aten.linear.default, (PREV, Param("lowrank_v"), None), factor=True),
                         Step(aten.linear.default, (PREV, Param("lowrank_u"), Keep(bias)), factor=True)])
"""
from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ...errors import RecipeError
from ...ir.meta import Factorization, Lineage, lineage, module_path, set_record
from ..analysis.shape_prop import propagate_shapes
from ..base import PassContext, PassResult
from ..cleanup.dce import remove_unused_attributes

__all__ = ["PREV", "Param", "Keep", "Step", "Chain", "Plan", "Skip", "fetch_attr", "const_weight",
           "run_factorize", "run_chain", "shape_of", "conv_args", "one_thread"]

aten = torch.ops.aten


class _Prev:
    def __repr__(self) -> str:
        return "PREV"


PREV = _Prev()  # the previous step's output (the original node's input for step 0)


@dataclass(frozen=True)
class Param:
    """A new parameter the chain owns, registered as `<owner>.<name>`."""

    name: str


@dataclass(frozen=True)
class Keep:
    """An existing node of the graph (e.g. the original bias get_attr) reused as is."""

    node: fx.Node


@dataclass(frozen=True)
class Step:
    op: Any
    args: tuple
    factor: bool = False  # a compute op that applies one factor (gets a Factorization record)


@dataclass
class Chain:
    params: dict[str, torch.Tensor]
    steps: list[Step]


@dataclass
class Plan:
    """What a method proposes for one node: the chain plus the numbers the report shows."""

    chain: Chain
    rank: tuple[int, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rel_error: float
    note: str = ""


class Skip(Exception):
    """Raised by a method's planner: this node is left alone, for the stated reason."""


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def shape_of(node) -> tuple[int, ...]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        raise Skip("no shape recorded (run shape propagation first)")
    return tuple(int(s) for s in v.shape)


def const_weight(gm: fx.GraphModule, node: fx.Node, arg: Any) -> torch.Tensor:
    """The float parameter tensor behind `arg`, or Skip saying why it is not one."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        raise Skip("weight is not a constant parameter (computed or quantized)")
    if len(arg.users) != 1:
        raise Skip(f"weight {arg.target} is shared by {len(arg.users)} nodes (tied weights)")
    t = fetch_attr(gm, arg.target)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise Skip(f"weight {arg.target} is not a float tensor")
    return t.detach()


def conv_args(node: fx.Node) -> tuple:
    """(x, w, b, stride, padding, dilation, groups) of an aten.conv2d node, defaults filled in."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, [1, 1], [0, 0], [1, 1], 1)
    vals = [node.args[i] if i < len(node.args) else node.kwargs.get(n, d)
            for i, (n, d) in enumerate(zip(names, defaults))]
    for i in (3, 4, 5):
        v = vals[i]
        vals[i] = [int(v)] * 2 if isinstance(v, int) else [int(a) for a in v]
        if len(vals[i]) == 1:
            vals[i] = vals[i] * 2
    return tuple(vals)


def _resolve(arg, prev, params, gm):
    if arg is PREV:
        return prev
    if isinstance(arg, Param):
        return params[arg.name]
    if isinstance(arg, Keep):
        return fetch_attr(gm, arg.node.target) if arg.node.op == "get_attr" else None
    if isinstance(arg, (list, tuple)):
        return type(arg)(_resolve(a, prev, params, gm) for a in arg)
    return arg


def run_chain(chain: Chain, x: torch.Tensor, gm: fx.GraphModule | None = None) -> torch.Tensor:
    """Run `chain` eagerly on `x` (used to time it and to check it against the original op)."""
    y = x
    for s in chain.steps:
        y = s.op(*_resolve(s.args, y, chain.params, gm))
    return y


def _best_ms(fn: Callable, x: torch.Tensor, reps: int) -> float:
    # the minimum, not the median: on a shared machine interference only ever adds time
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _owner_and_prefix(weight_target: str) -> tuple[str, str]:
    """`fc.weight` -> ("fc", "lowrank"); a root param `w` -> ("", "w_lowrank")."""
    owner, _, attr = str(weight_target).rpartition(".")
    return owner, ("lowrank" if attr == "weight" else f"{attr}_lowrank")


def _register(gm: fx.GraphModule, owner: str, name: str, t: torch.Tensor) -> str:
    mod = gm.get_submodule(owner) if owner else gm
    base, i = name, 0
    while hasattr(mod, name):
        i += 1
        name = f"{base}{i}"
    mod.register_parameter(name, torch.nn.Parameter(t.detach().clone().contiguous()))
    return f"{owner}.{name}" if owner else name


def _emit(gm: fx.GraphModule, node: fx.Node, x: fx.Node, weight: fx.Node, plan: Plan,
          method: str) -> fx.Node:
    owner, prefix = _owner_and_prefix(weight.target)
    lin = lineage(node) or Lineage(module_path(node), "", str(node.target))
    wlin = lineage(weight) or Lineage(owner, "", "get_attr")
    attrs: dict[str, fx.Node] = {}
    with gm.graph.inserting_before(node):
        for name, t in plan.chain.params.items():
            target = _register(gm, owner, f"{prefix}_{name}", t)
            attrs[name] = gm.graph.get_attr(target)
            set_record(attrs[name], wlin.derived("get_attr"))
        n_factors = sum(s.factor for s in plan.chain.steps)
        k, prev = 0, x
        for s in plan.chain.steps:
            def sub(a):
                if a is PREV:
                    return prev
                if isinstance(a, Param):
                    return attrs[a.name]
                if isinstance(a, Keep):
                    return a.node
                if isinstance(a, (list, tuple)):
                    return type(a)(sub(b) for b in a)
                return a
            new = gm.graph.call_function(s.op, tuple(sub(a) for a in s.args))
            set_record(new, lin.derived(f"lowrank:{method}:{s.op}"))
            if s.factor:
                set_record(new, Factorization(method, plan.rank, tuple(fetch_attr(gm, weight.target).shape),
                                              node.name, k, n_factors, plan.rel_error))
                k += 1
            prev = new
    # later nodes' planners read their input's shape before the final re-propagation
    if "val" in node.meta:
        prev.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(prev)
    gm.graph.erase_node(node)
    return prev


def _selected(path: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(path, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(path, p) for p in exclude)


@contextlib.contextmanager
def one_thread():
    """Run the decompositions on one intra-op thread, restoring the caller's count after.

    They are many small SVDs / einsums; on a loaded 2-core machine OpenMP's spinning made
    each one 30x slower with 2 threads than with 1 (measured: 4.7 ms vs 0.15 ms).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_factorize(gm: fx.GraphModule, ctx: PassContext, cfg, *, method: str, targets: set,
                  planner: Callable[[fx.GraphModule, fx.Node, Any], Plan],
                  weight_arg: Callable[[fx.Node], fx.Node], prepare: Callable | None = None,
                  node_filter: Callable[[fx.Node], bool] | None = None) -> PassResult:
    """For each `targets` node selected by cfg.include/exclude: plan, check it pays, rewrite.

    `planner(gm, node, extra)` returns a Plan or raises Skip; `prepare(gm, nodes, ctx)`
    computes per-node extras once (e.g. calibration statistics for whitening).
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets
             and (node_filter is None or node_filter(n))
             and _selected(module_path(n), cfg.include, cfg.exclude)]
    extras = prepare(gm, nodes, ctx) if prepare else {}
    if cfg.budget_scope == "model" and cfg.budget is not None:
        plans = _plan_model_budget(gm, nodes, cfg, planner, extras)
    else:
        plans = {n: _plan_one(gm, n, cfg, planner, extras) for n in nodes}
    layers: dict[str, dict] = {}
    skipped: list[str] = []
    done = 0
    for node, plan in plans.items():  # all planned first: planners read the untouched graph
        path = module_path(node)
        if isinstance(plan, Skip):
            skipped.append(f"{path}: {plan}")
            continue
        _emit(gm, node, node.args[0], weight_arg(node), plan, method)
        done += 1
        layers[path] = {"rank": plan.rank, "params": (plan.params_before, plan.params_after),
                        "macs": (plan.macs_before, plan.macs_after), "rel_error": round(plan.rel_error, 5)}
        if plan.note:
            layers[path]["note"] = plan.note
    if done:
        gm.graph.eliminate_dead_code()
        remove_unused_attributes(gm)
        gm.graph.lint()
        gm.recompile()
        propagate_shapes(gm, ctx.example_inputs or None)
    macs = [sum(v["macs"][i] for v in layers.values()) for i in (0, 1)]
    params = [sum(v["params"][i] for v in layers.values()) for i in (0, 1)]
    stats = {"factorized": done, "skipped": skipped, "layers": layers,
             "macs_before": macs[0], "macs_after": macs[1],
             "params_before": params[0], "params_after": params[1]}
    ctx.report.setdefault("lowrank", {}).setdefault(method, {}).update(
        {"layers": {**ctx.report.get("lowrank", {}).get(method, {}).get("layers", {}), **layers},
         "skipped": ctx.report.get("lowrank", {}).get(method, {}).get("skipped", []) + skipped})
    return PassResult(gm, done > 0, stats)


def _check_speed(gm: fx.GraphModule, node: fx.Node, plan: Plan, reps: int = 20) -> None:
    """Skip unless the chain runs faster than the dense op, eagerly, on inputs of the node's shape.

    Both are timed on one thread, best of `reps`: a per-layer A/B that a busy machine's
    thread contention cannot flip (the deployed graph's speed is the backend's to measure).
    """
    x = torch.randn(shape_of(node.args[0]))
    args = tuple(fetch_attr(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a
                 for a in node.args[1:])
    from ...latency import LatencyService

    def best_of(keys, builders):  # the latency service's timer: one thread, best of `reps`
        with one_thread():
            return {f: _best_ms(*builders[f](), reps) for f in keys}
    # cached by (op, shapes, ranks, ISA): a second compress of the same model times nothing
    shapes = (tuple(x.shape), tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a
                                    for a in args), tuple(plan.rank),
              tuple(tuple(p.shape) for p in plan.chain.params.values()))
    ms = LatencyService("eager", timer=best_of).compare(
        str(node.target), shapes, str(x.dtype).replace("torch.", ""),
        {"dense": lambda: (lambda t: node.target(t, *args), x),
         "factorized": lambda: (lambda t: run_chain(plan.chain, t, gm), x)})
    dense, fact = ms["dense"], ms["factorized"]
    if fact >= dense:
        raise Skip(f"not faster: factorized {fact:.3f} ms >= dense {dense:.3f} ms "
                   "(eager, one thread, best of {reps})".replace("{reps}", str(reps)))


def _plan_one(gm, node, cfg, planner, extras) -> Plan | Skip:
    try:
        with one_thread():
            plan = planner(gm, node, extras.get(node.name), cfg)
        if plan.macs_after >= plan.macs_before:
            raise Skip(f"not cheaper: rank {plan.rank} needs {plan.macs_after:,} MACs "
                       f">= {plan.macs_before:,} dense")
        if cfg.verify_speed:
            _check_speed(gm, node, plan)
    except Skip as why:
        return why
    return plan


def _plan_model_budget(gm, nodes, cfg, planner, extras) -> dict:
    """A whole-graph MAC budget: solve for the per-layer fraction that meets it.

    Layers that cannot shrink at that fraction keep their dense MACs, so the fraction is
    solved again over the rest until no more layers drop out.
    """
    from dataclasses import replace

    from ..analysis.cost import node_cost
    total = sum(node_cost(gm, n).macs for n in gm.graph.nodes if n.op == "call_function")
    dense = {n: node_cost(gm, n).macs for n in nodes}
    plans: dict = {}
    active = list(nodes)
    for _ in range(len(nodes) + 1):
        mine = sum(dense[n] for n in active)
        if not mine:
            break
        frac = (cfg.budget * total - (total - mine)) / mine
        if frac <= 0:
            raise RecipeError(f"a model budget of {cfg.budget} cannot be met: the layers this method "
                              f"can factorize hold {mine / total:.1%} of the MACs", field="budget",
                              value=cfg.budget)
        layer_cfg = replace(cfg, budget=min(frac, 1.0), budget_scope="layer")
        plans.update({n: _plan_one(gm, n, layer_cfg, planner, extras) for n in active})
        dropped = [n for n in active if isinstance(plans[n], Skip)]
        if not dropped:
            break
        active = [n for n in active if n not in dropped]
    return {n: plans[n] for n in nodes}
