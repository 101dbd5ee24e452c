"""Tucker-2: conv2d(x, W) becomes 1x1 conv (I -> r_in), kxk core conv (r_in -> r_out), 1x1 conv (r_out -> O).

Kim et al. (ICLR 2016): W (O, I, kh, kw) ~ core x_0 U_out x_1 U_in, decomposing the two
channel modes only, so the spatial kernel survives in the core conv, which keeps the
original stride, padding and dilation. Factors come from HOSVD refined by a few HOOI
sweeps (torch.linalg SVDs of the two unfoldings; no iterative solver to diverge).

    cm = fxpress.compress(model, (x,), fxpress.LowRank(method="tucker", budget=0.5))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ..base import Pass, PassContext, PassResult
from .common import (PREV, Chain, Keep, Param, Plan, Skip, Step, const_weight, conv_args, one_thread,
                     run_factorize, shape_of)
from .rank import budget_scale, energy_rank, vbmf_rank

__all__ = ["TuckerFactorize", "tucker2"]

aten = torch.ops.aten
_CONV = aten.conv2d.default


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The r leading left singular vectors of m, from the eigenvectors of m m^T (float64).

    m is short and wide here (channels x rank*taps): the Gram eigenproblem is channels^2,
    several times cheaper than the SVD of m for ResNet's 512 x 4608 unfoldings.
    """
    if m.shape[0] >= m.shape[1]:
        return torch.linalg.svd(m, full_matrices=False)[0][:, :r]
    _, vecs = torch.linalg.eigh(m @ m.T)
    return vecs.flip(1)[:, :r]


@one_thread()
def tucker2(w: torch.Tensor, r_out: int, r_in: int, sweeps: int = 10):
    """(core (r_out, r_in, kh, kw), U_out (O, r_out), U_in (I, r_in)) by HOSVD + HOOI, float64."""
    w = w.double()
    o, i = w.shape[:2]
    u_out = _leading(w.reshape(o, -1), r_out)
    u_in = _leading(w.transpose(0, 1).reshape(i, -1), r_in)
    fit = 0.0
    for _ in range(sweeps):
        u_out = _leading(torch.einsum("oikl,is->oskl", w, u_in).reshape(o, -1), r_out)
        u_in = _leading(torch.einsum("oikl,or->irkl", w, u_out).reshape(i, -1), r_in)
        # HOOI maximises the core norm; stop once a sweep stops raising it
        new_fit = float(torch.linalg.norm(torch.einsum("oikl,or,is->rskl", w, u_out, u_in)))
        if new_fit - fit <= 1e-10 * new_fit:
            break
        fit = new_fit
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    return core, u_out, u_in


def _consistent(r_out: int, r_in: int, k: int) -> tuple[int, int]:
    """Tucker-2 ranks a kernel of k spatial taps can have: each <= the other times k."""
    return min(r_out, r_in * k), min(r_in, r_out * k)


def _ranks(cfg, w: torch.Tensor, cost) -> tuple[int, int]:
    o, i, kh, kw = w.shape
    k = kh * kw
    w0 = w.double().reshape(o, -1)
    w1 = w.double().transpose(0, 1).reshape(i, -1)
    if cfg.rank is not None:
        r_out, r_in = (cfg.rank, cfg.rank) if isinstance(cfg.rank, int) else cfg.rank
        if r_out > min(o, w0.shape[1]) or r_in > min(i, w1.shape[1]) or (r_out, r_in) != _consistent(r_out, r_in, k):
            raise Skip(f"rank ({r_out}, {r_in}) is larger than the weight allows "
                       f"(<= ({min(o, w0.shape[1])}, {min(i, w1.shape[1])}), each <= the other x {k})")
        return r_out, r_in
    if cfg.energy is not None:
        return _consistent(energy_rank(torch.linalg.svdvals(w0), cfg.energy),
                           energy_rank(torch.linalg.svdvals(w1), cfg.energy), k)
    if cfg.vbmf:
        return _consistent(vbmf_rank(w0), vbmf_rank(w1), k)
    # budget: ranks in proportion to the channel counts, the largest that fit
    cap_o, cap_i = min(o, w0.shape[1]), min(i, w1.shape[1])

    def at(a):
        return _consistent(max(1, min(cap_o, round(a * o))), max(1, min(cap_i, round(a * i))), k)
    a = budget_scale(lambda a: cost(*at(a)), cfg.budget, cost(None, None))
    r_out, r_in = at(a)
    if cost(r_out, r_in) > cfg.budget * cost(None, None):
        raise Skip(f"no Tucker ranks fit {cfg.budget_on} budget {cfg.budget}")
    return r_out, r_in


def _plan(gm: fx.GraphModule, node: fx.Node, _extra, cfg) -> Plan:
    x, w_node, b_node, stride, padding, dilation, groups = conv_args(node)
    if groups != 1:
        raise Skip(f"grouped conv (groups={groups}): Tucker-2 needs groups=1")
    w = const_weight(gm, node, w_node)
    o, i, kh, kw = w.shape
    n, _, h, wd = shape_of(x)
    _, _, ho, wo = shape_of(node)
    nb = o if b_node is not None else 0

    def macs(ro, ri):
        if ro is None:
            return n * ho * wo * o * i * kh * kw
        return n * (h * wd * i * ri + ho * wo * ri * ro * kh * kw + ho * wo * ro * o)

    def params(ro, ri):
        return o * i * kh * kw if ro is None else i * ri + ri * ro * kh * kw + ro * o
    r_out, r_in = _ranks(cfg, w, macs if cfg.budget_on == "macs" else params)
    core, u_out, u_in = tucker2(w, r_out, r_in)
    approx = torch.einsum("rskl,or,is->oikl", core, u_out, u_in)
    err = float(torch.linalg.norm(w.double() - approx) / max(float(torch.linalg.norm(w.double())), 1e-30))
    dt = w.dtype
    chain = Chain(
        {"in": u_in.T.reshape(r_in, i, 1, 1).to(dt), "core": core.to(dt), "out": u_out.reshape(o, r_out, 1, 1).to(dt)},
        [Step(_CONV, (PREV, Param("in"), None, [1, 1], [0, 0], [1, 1], 1), True),
         Step(_CONV, (PREV, Param("core"), None, stride, padding, dilation, 1), True),
         Step(_CONV, (PREV, Param("out"), Keep(b_node) if b_node is not None else None,
                      [1, 1], [0, 0], [1, 1], 1), True)])
    return Plan(chain, (r_out, r_in), macs(None, None), macs(r_out, r_in),
                params(None, None) + nb, params(r_out, r_in) + nb, err)


@dataclass(frozen=True)
class TuckerFactorize(Pass):
    """Rewrite each selected conv2d into a Tucker-2 chain of three convs (see module doc)."""

    name: ClassVar[str] = "lowrank_tucker"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)
    config: object = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return run_factorize(gm, ctx, self.config, method="tucker", targets={_CONV},
                             planner=_plan, weight_arg=lambda n: conv_args(n)[1])
