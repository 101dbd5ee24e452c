"""Tensor train: linear(x, W, b) becomes d (reshape, permute, mm) steps over TT-matrix cores, plus the bias add.

Novikov et al. (NeurIPS 2015): with out = o_1..o_d and in = i_1..i_d, W is a TT-matrix with
cores G_k (r_{k-1}, o_k, i_k, r_k), found by TT-SVD (Oseledets 2011: sequential truncated
SVDs of the (o_k i_k)-mode unfoldings). The lowering contracts one core per matmul,
from the last to the first, so every backend runs plain reshapes, permutes and mm:

    state (N * i_1..i_{k-1}, i_k, o_{k+1}..o_d, r_k) --permute/reshape--> (., i_k r_k)
          @ M_k (i_k r_k, r_{k-1} o_k) --reshape/permute--> (N * i_1..i_{k-2}, i_{k-1}, o_k..o_d, r_{k-1})

    cm = fxpress.compress(model, (x,), fxpress.LowRank(method="tt", tt_order=3, rank=16))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..base import Pass, PassContext, PassResult
from .common import PREV, Chain, Keep, Param, Plan, Skip, Step, const_weight, run_factorize, shape_of
from .rank import budget_rank, energy_rank, vbmf_rank

__all__ = ["TTFactorize", "tt_svd", "split_dim", "tt_macs"]

aten = torch.ops.aten
_LINEAR = aten.linear.default


def split_dim(n: int, d: int) -> tuple[int, ...]:
    """`n` as d factors, as equal as its prime factors allow (largest first)."""
    primes, k, m = [], 2, n
    while k * k <= m:
        while m % k == 0:
            primes.append(k)
            m //= k
        k += 1
    if m > 1:
        primes.append(m)
    buckets = [1] * d
    for p in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= p
    return tuple(sorted(buckets, reverse=True))


def _bond_caps(outs, ins) -> list[int]:
    n = [o * i for o, i in zip(outs, ins)]
    return [min(math.prod(n[:k + 1]), math.prod(n[k + 1:])) for k in range(len(n) - 1)]


def tt_macs(rows: int, outs, ins, ranks) -> int:
    """MACs of the lowered chain: core k multiplies (rows * i_<k * o_>k) x (i_k r_k) by (i_k r_k) x (r_{k-1} o_k)."""
    r = [1, *ranks, 1]
    d = len(outs)
    return sum(rows * math.prod(ins[:k]) * math.prod(outs[k + 1:]) * ins[k] * r[k + 1] * r[k] * outs[k]
               for k in range(d))


def tt_params(outs, ins, ranks) -> int:
    r = [1, *ranks, 1]
    return sum(r[k] * outs[k] * ins[k] * r[k + 1] for k in range(len(outs)))


def tt_svd(w: torch.Tensor, outs, ins, pick) -> list[torch.Tensor]:
    """Cores G_k (r_{k-1}, o_k, i_k, r_k) of W (prod outs x prod ins); pick(k, c, s) -> r_k."""
    d = len(outs)
    t = w.double().reshape(*outs, *ins)
    t = t.permute([p for k in range(d) for p in (k, d + k)])  # (o1, i1, o2, i2, ...)
    cores, r_prev, c = [], 1, t.reshape(-1)
    for k in range(d - 1):
        c = c.reshape(r_prev * outs[k] * ins[k], -1)
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        r = pick(k, c, s)
        cores.append(u[:, :r].reshape(r_prev, outs[k], ins[k], r))
        c = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(c.reshape(r_prev, outs[-1], ins[-1], 1))
    return cores


def _tt_dense(cores) -> torch.Tensor:
    d = len(cores)
    t = cores[0]
    for g in cores[1:]:
        t = torch.tensordot(t, g, dims=([t.dim() - 1], [0]))
    t = t.squeeze(0).squeeze(-1)  # (o1, i1, o2, i2, ...)
    t = t.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    outs = [g.shape[1] for g in cores]
    return t.reshape(math.prod(outs), -1)


def _chain(cores, rows: int, lead: tuple[int, ...], bias: fx.Node | None, dt) -> Chain:
    d = len(cores)
    outs, ins = [g.shape[1] for g in cores], [g.shape[2] for g in cores]
    r = [1] + [g.shape[3] for g in cores]
    params, steps = {}, []
    # -1 for the row count: the batch stays dynamic (the example's `rows` is not baked in)
    a, o_done = math.prod(ins[:-1]), 1
    steps.append(Step(aten.reshape.default, (PREV, [-1, ins[-1], 1, 1])))
    for k in range(d - 1, -1, -1):
        name = f"core{k}"
        # M_k: (i_k r_k) x (r_{k-1} o_k)
        params[name] = cores[k].permute(2, 3, 0, 1).reshape(ins[k] * r[k + 1], r[k] * outs[k]).to(dt)
        if o_done > 1:
            steps.append(Step(aten.permute.default, (PREV, [0, 2, 1, 3])))
        steps.append(Step(aten.reshape.default, (PREV, [-1, ins[k] * r[k + 1]])))
        steps.append(Step(aten.mm.default, (PREV, Param(name)), True))
        steps.append(Step(aten.reshape.default, (PREV, [-1, o_done, r[k], outs[k]])))
        steps.append(Step(aten.permute.default, (PREV, [0, 3, 1, 2])))
        o_done *= outs[k]
        if k > 0:
            a //= ins[k - 1]
            steps.append(Step(aten.reshape.default, (PREV, [-1, ins[k - 1], o_done, r[k]])))
    steps.append(Step(aten.reshape.default, (PREV, [-1, *lead[1:], o_done] if lead else [o_done])))
    if bias is not None:
        steps.append(Step(aten.add.Tensor, (PREV, Keep(bias))))
    return Chain(params, steps)


def _shape(cfg, out_f: int, in_f: int):
    if cfg.tt_shape is not None:
        outs, ins = cfg.tt_shape
        if math.prod(outs) != out_f or math.prod(ins) != in_f:
            raise Skip(f"tt_shape {cfg.tt_shape} does not multiply to ({out_f}, {in_f})")
        return outs, ins
    outs, ins = split_dim(out_f, cfg.tt_order), split_dim(in_f, cfg.tt_order)
    if any(o * i == 1 for o, i in zip(outs, ins)):
        raise Skip(f"({out_f}, {in_f}) has too few prime factors for {cfg.tt_order} TT cores")
    return outs, ins


def _plan(gm: fx.GraphModule, node: fx.Node, _extra, cfg) -> Plan:
    w = const_weight(gm, node, node.args[1])
    out_f, in_f = w.shape
    outs, ins = _shape(cfg, out_f, in_f)
    d = len(outs)
    x_shape = shape_of(node.args[0])
    rows = math.prod(x_shape) // in_f
    bias = node.args[2] if len(node.args) > 2 else None
    nb = out_f if bias is not None else 0
    caps = _bond_caps(outs, ins)
    if cfg.rank is not None:
        want = [cfg.rank] * (d - 1) if isinstance(cfg.rank, int) else list(cfg.rank)
        if len(want) != d - 1:
            raise Skip(f"{len(want)} bond ranks given for {d} cores (needs {d - 1})")
        if any(x > c for x, c in zip(want, caps)):
            raise Skip(f"rank {tuple(want)} is larger than the TT bonds allow {tuple(caps)}")
    elif cfg.budget is not None:
        def cost(cap):
            rk = [min(cap, c) for c in caps]
            return tt_macs(rows, outs, ins, rk) if cfg.budget_on == "macs" else tt_params(outs, ins, rk)
        dense = rows * out_f * in_f if cfg.budget_on == "macs" else out_f * in_f
        cap = budget_rank(cost, cfg.budget, dense, max(caps))
        if cap == 0:
            raise Skip(f"no TT rank fits {cfg.budget_on} budget {cfg.budget}")
        want = [min(cap, c) for c in caps]

    def pick(k, c, s):
        if cfg.rank is not None or cfg.budget is not None:
            return want[k]
        return energy_rank(s, cfg.energy) if cfg.energy is not None else vbmf_rank(c)
    cores = tt_svd(w, outs, ins, pick)
    ranks = tuple(g.shape[3] for g in cores[:-1])
    err = float(torch.linalg.norm(w.double() - _tt_dense(cores)) / max(float(torch.linalg.norm(w.double())), 1e-30))
    chain = _chain(cores, rows, tuple(shape_of(node)[:-1]), bias, w.dtype)
    return Plan(chain, ranks, rows * out_f * in_f, tt_macs(rows, outs, ins, ranks),
                out_f * in_f + nb, tt_params(outs, ins, ranks) + nb, err,
                note=f"tt_shape={tuple(outs)}x{tuple(ins)}")


@dataclass(frozen=True)
class TTFactorize(Pass):
    """Rewrite each selected linear into a tensor-train chain of reshapes and matmuls (see module doc)."""

    name: ClassVar[str] = "lowrank_tt"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)
    config: object = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return run_factorize(gm, ctx, self.config, method="tt", targets={_LINEAR},
                             planner=_plan, weight_arg=lambda n: n.args[1])
