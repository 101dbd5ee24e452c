"""CP: conv2d(x, W) becomes 1x1 conv (I -> R), depthwise kx1, depthwise 1xk, 1x1 conv (R -> O).

Lebedev et al. (ICLR 2015): W (O, I, kh, kw) ~ sum_r a_o[:, r] (x) a_i[:, r] (x) a_h[:, r] (x) a_w[:, r].
The vertical depthwise conv carries the original vertical stride / padding / dilation,
the horizontal one the horizontal ones, so any ungrouped conv2d maps exactly.

Stability and memory: ALS starts from the leading singular vectors of each unfolding
(HOSVD init, as tensorly's init="svd"), solves each mode with a small ridge term
(guards against the diverging, cancelling components CP-ALS is known for), and
contracts the weight with the largest other mode first, so the working set is
numel(W) / max(O, I) * R numbers, never a Khatri-Rao product of the full unfolding;
a layer whose working set exceeds `max_memory_mb` is skipped, not allocated.

    cm = fxpress.compress(model, (x,), fxpress.LowRank(method="cp", budget=0.5))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..base import Pass, PassContext, PassResult
from .common import (PREV, Chain, Keep, Param, Plan, Skip, Step, const_weight, conv_args, one_thread,
                     run_factorize, shape_of)
from .rank import budget_rank, energy_rank, vbmf_rank

__all__ = ["CPFactorize", "cp_als", "cp_working_set"]

aten = torch.ops.aten
_CONV = aten.conv2d.default


def cp_working_set(shape: tuple[int, ...], rank: int) -> int:
    """Bytes ALS needs beyond the weight: the first partial contraction, a reconstruction, factors."""
    o, i = shape[:2]
    numel = math.prod(shape)
    return 8 * (numel // max(o, i) * rank + 2 * numel + sum(shape) * rank)


def _mttkrp(w: torch.Tensor, f: list[torch.Tensor], mode: int) -> torch.Tensor:
    """W unfolded along `mode` times the Khatri-Rao product of the other factors, pairwise."""
    a_o, a_i, a_h, a_w = f
    if mode == 0:
        return torch.einsum("oklr,kr,lr->or", torch.einsum("oikl,ir->oklr", w, a_i), a_h, a_w)
    t = torch.einsum("oikl,or->iklr", w, a_o)
    if mode == 1:
        return torch.einsum("iklr,kr,lr->ir", t, a_h, a_w)
    if mode == 2:
        return torch.einsum("iklr,ir,lr->kr", t, a_i, a_w)
    return torch.einsum("iklr,ir,kr->lr", t, a_i, a_h)


def _init(w: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for m, d in enumerate(w.shape):
        unf = w.movedim(m, 0).reshape(d, -1)
        u = torch.linalg.svd(unf, full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:  # more components than this mode has directions
            extra = torch.randn(d, rank - u.shape[1], generator=gen, dtype=w.dtype) / math.sqrt(d)
            u = torch.cat([u, extra], 1)
        out.append(u)
    return out


@one_thread()
def cp_als(w: torch.Tensor, rank: int, iters: int = 300, tol: float = 1e-6, ridge: float = 1e-9,
           seed: int = 0) -> tuple[list[torch.Tensor], float]:
    """Rank-`rank` CP of a 4-way tensor by ridge-regularised ALS from an SVD start, float64.

    Returns ([A_o, A_i, A_h, A_w] with the weights folded into A_o, relative error).
    """
    w = w.double()
    gen = torch.Generator().manual_seed(seed)
    f = _init(w, rank, gen)
    norm = float(torch.linalg.norm(w)) or 1.0
    weights = torch.ones(rank, dtype=w.dtype)
    prev = math.inf
    err = math.inf
    for it in range(iters):
        for m in range(4):
            gram = torch.ones(rank, rank, dtype=w.dtype)
            for j in range(4):
                if j != m:
                    gram = gram * (f[j].T @ f[j])
            gram = gram + ridge * float(gram.diagonal().max()) * torch.eye(rank, dtype=w.dtype)
            f[m] = torch.linalg.solve(gram, _mttkrp(w, f, m).T).T
            weights = torch.linalg.norm(f[m], dim=0).clamp_min(1e-300)
            f[m] = f[m] / weights
        if it % 5 == 4 or it == iters - 1:
            approx = torch.einsum("r,or,ir,kr,lr->oikl", weights, *f)
            err = float(torch.linalg.norm(w - approx)) / norm
            if err < 1e-9 or abs(prev - err) < tol * max(err, 1e-12):
                break
            prev = err
    f[0] = f[0] * weights
    return f, err


def _choose_rank(cfg, w, cost, dense, bound) -> int:
    o, i = w.shape[:2]
    if cfg.rank is not None:
        if cfg.rank > bound:
            raise Skip(f"rank {cfg.rank} is larger than the weight allows "
                       f"(CP rank <= {bound} for shape {tuple(w.shape)})")
        return cfg.rank
    w0, w1 = w.double().reshape(o, -1), w.double().transpose(0, 1).reshape(i, -1)
    # a CP rank is at least each multilinear rank: take the larger of the two channel modes'
    if cfg.energy is not None:
        return max(energy_rank(torch.linalg.svdvals(w0), cfg.energy),
                   energy_rank(torch.linalg.svdvals(w1), cfg.energy))
    if cfg.vbmf:
        return max(vbmf_rank(w0), vbmf_rank(w1))
    r = budget_rank(cost, cfg.budget, dense, bound)
    if r == 0:
        raise Skip(f"no CP rank fits {cfg.budget_on} budget {cfg.budget}")
    return r


def _plan(gm: fx.GraphModule, node: fx.Node, _extra, cfg) -> Plan:
    x, w_node, b_node, stride, padding, dilation, groups = conv_args(node)
    if groups != 1:
        raise Skip(f"grouped conv (groups={groups}): CP needs groups=1")
    w = const_weight(gm, node, w_node)
    o, i, kh, kw = w.shape
    if kh == 1 and kw == 1:
        raise Skip("1x1 conv: CP adds two no-op depthwise convs; use method='svd' or 'tucker'")
    n, _, h, wd = shape_of(x)
    _, _, ho, wo = shape_of(node)
    nb = o if b_node is not None else 0
    dense_macs, dense_params = n * ho * wo * o * i * kh * kw, o * i * kh * kw

    def macs(r):
        return n * r * (h * wd * i + ho * wd * kh + ho * wo * kw + ho * wo * o)

    def params(r):
        return r * (i + kh + kw + o)
    bound = math.prod(w.shape) // max(w.shape)
    cost, dense = (macs, dense_macs) if cfg.budget_on == "macs" else (params, dense_params)
    r = _choose_rank(cfg, w, cost, dense, bound)
    need = cp_working_set(tuple(w.shape), r)
    if need > cfg.max_memory_mb * 2**20:
        raise Skip(f"CP-ALS working set {need / 2**20:.0f} MB > max_memory_mb={cfg.max_memory_mb}")
    (a_o, a_i, a_h, a_w), err = cp_als(w, r, iters=cfg.cp_iters)
    dt = w.dtype
    chain = Chain(
        {"in": a_i.T.reshape(r, i, 1, 1).to(dt), "vertical": a_h.T.reshape(r, 1, kh, 1).to(dt),
         "horizontal": a_w.T.reshape(r, 1, 1, kw).to(dt), "out": a_o.reshape(o, r, 1, 1).to(dt)},
        [Step(_CONV, (PREV, Param("in"), None, [1, 1], [0, 0], [1, 1], 1), True),
         Step(_CONV, (PREV, Param("vertical"), None, [stride[0], 1], [padding[0], 0], [dilation[0], 1], r), True),
         Step(_CONV, (PREV, Param("horizontal"), None, [1, stride[1]], [0, padding[1]], [1, dilation[1]], r), True),
         Step(_CONV, (PREV, Param("out"), Keep(b_node) if b_node is not None else None,
                      [1, 1], [0, 0], [1, 1], 1), True)])
    return Plan(chain, (r,), dense_macs, macs(r), dense_params + nb, params(r) + nb, err)


@dataclass(frozen=True)
class CPFactorize(Pass):
    """Rewrite each selected conv2d into a CP chain of four convs (see module doc)."""

    name: ClassVar[str] = "lowrank_cp"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)
    config: object = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return run_factorize(gm, ctx, self.config, method="cp", targets={_CONV},
                             planner=_plan, weight_arg=lambda n: conv_args(n)[1])
