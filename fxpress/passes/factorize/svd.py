"""SVD: linear(x, W, b) becomes linear(linear(x, V), U, b) and matmul(x, W) becomes matmul(matmul(x, V), U).

W (out x in) ~ U (out x r) . V (r x in), each factor carrying sqrt of the singular values.
With `whiten=True` the truncation minimises the *output* error on calibration data
instead of the weight error (SVD-LLM, Wang et al. 2024; ASVD is the diagonal variant):
with S the Cholesky factor of X^T X, factor W.S and map back with S^-1, so the
discarded singular values are exactly the output error ||(W - W_r) X||_F.

    cm = fxpress.compress(model, (x,), fxpress.LowRank(method="svd", energy=0.9))
    cm.report["lowrank_svd"]["layers"]["fc"]["rank"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ...errors import CalibrationError
from ...utils import iter_batches
from ..base import Pass, PassContext, PassResult
from .common import PREV, Chain, Keep, Param, Plan, Skip, Step, const_weight, run_factorize, shape_of
from .rank import budget_rank, energy_rank, vbmf_rank

__all__ = ["SVDFactorize", "svd_factors", "collect_grams"]

aten = torch.ops.aten
_LINEAR = aten.linear.default
_MATMULS = {aten.matmul.default, aten.mm.default}


def _weight_arg(node: fx.Node) -> fx.Node:
    return node.args[1]


def collect_grams(gm: fx.GraphModule, nodes: list[fx.Node], batches, limit: int) -> dict[str, torch.Tensor]:
    """X^T X (float64) of the input of each node in `nodes`, over up to `limit` calibration batches."""
    want = {n.name: n for n in nodes}
    grams: dict[str, torch.Tensor] = {}

    class _Tap(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in want:
                x = self.env[n.args[0]].detach()
                x = x.reshape(-1, x.shape[-1]).double()
                g = x.T @ x
                grams[n.name] = grams[n.name] + g if n.name in grams else g
            return out

    seen = 0
    with torch.no_grad():
        for batch in iter_batches(batches):
            if seen >= limit:
                break
            _Tap(gm).run(*pytree.tree_leaves(batch))
            seen += 1
    if seen == 0:
        raise CalibrationError("LowRank(whiten=True) got an empty calibration set")
    return grams


def _cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Lower S with S S^T = gram, damped just enough to be positive definite (rank-deficient X)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    damp = 1e-8 * float(gram.diagonal().mean()) or 1e-12
    for _ in range(12):
        s, info = torch.linalg.cholesky_ex(gram + damp * eye)
        if int(info) == 0:
            return s
        damp *= 10
    raise Skip("calibration Gram matrix is not positive definite even after damping")


def svd_factors(w: torch.Tensor, rank: int, s_white: torch.Tensor | None = None):
    """(U, V) with U (out x r), V (r x in) and U.V ~ w; whitened by s_white when given."""
    m = w.double() if s_white is None else w.double() @ s_white
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    uu, vv = u[:, :rank] * root, root[:, None] * vh[:rank]
    if s_white is not None:  # vv S^-1 via a triangular solve: (S^T)^-1 applied from the right
        vv = torch.linalg.solve_triangular(s_white, vv, upper=False, left=False)
    return uu, vv


def _choose_rank(cfg, spectrum, m, cost, dense, hi) -> int:
    if cfg.rank is not None:
        if cfg.rank > hi:
            raise Skip(f"rank {cfg.rank} is larger than the matrix allows (min(out, in) = {hi})")
        return cfg.rank
    if cfg.energy is not None:
        return energy_rank(spectrum, cfg.energy)
    if cfg.vbmf:
        return vbmf_rank(m)
    r = budget_rank(cost, cfg.budget, dense, hi)
    if r == 0:
        raise Skip(f"no rank fits {cfg.budget_on} budget {cfg.budget}")
    return r


def _plan(gm: fx.GraphModule, node: fx.Node, gram, cfg) -> Plan:
    wt = const_weight(gm, node, node.args[1])
    if wt.dim() != 2:
        raise Skip(f"weight is {wt.dim()}-D, svd needs a matrix")
    is_linear = node.target is _LINEAR
    w = wt if is_linear else wt.T  # (out, in) either way
    out_f, in_f = w.shape
    x_shape = shape_of(node.args[0])
    if not is_linear and len(x_shape) < 2:
        raise Skip("matmul with a 1-D input")
    rows = math.prod(x_shape) // in_f
    bias = node.args[2] if is_linear and len(node.args) > 2 else None
    nb = out_f if bias is not None else 0
    s_white = _cholesky(gram) if cfg.whiten else None
    m = w.double() if s_white is None else w.double() @ s_white
    spectrum = torch.linalg.svdvals(m)
    per = rows if cfg.budget_on == "macs" else 1
    hi = min(out_f, in_f)
    r = _choose_rank(cfg, spectrum, m, lambda k: per * k * (in_f + out_f), per * out_f * in_f, hi)
    uu, vv = svd_factors(w, r, s_white)
    err = float(torch.linalg.norm(w.double() - uu @ vv) / max(float(torch.linalg.norm(w.double())), 1e-30))
    dt = wt.dtype
    if is_linear:
        chain = Chain({"v": vv.to(dt), "u": uu.to(dt)},
                      [Step(_LINEAR, (PREV, Param("v"), None), True),
                       Step(_LINEAR, (PREV, Param("u"), Keep(bias) if bias is not None else None), True)])
    else:
        chain = Chain({"v": vv.T.to(dt), "u": uu.T.to(dt)},
                      [Step(node.target, (PREV, Param("v")), True),
                       Step(node.target, (PREV, Param("u")), True)])
    note = "whitened" if cfg.whiten else ""
    return Plan(chain, (r,), rows * out_f * in_f, rows * r * (in_f + out_f),
                out_f * in_f + nb, r * (in_f + out_f) + nb, err, note)


@dataclass(frozen=True)
class SVDFactorize(Pass):
    """Rewrite each selected linear / constant-weight matmul into two thinner ones (see module doc)."""

    name: ClassVar[str] = "lowrank_svd"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)
    ensures: ClassVar[tuple[str, ...]] = ("shapes",)
    config: object = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config

        def prepare(gm, nodes, ctx):
            if not cfg.whiten:
                return {}
            if ctx.calibration is None:
                raise CalibrationError("LowRank(method='svd', whiten=True) needs calibration data: "
                                       "compress(..., calibration=batches)")
            return collect_grams(gm, nodes, ctx.calibration, cfg.calib_batches)

        def weight_is_param(n):
            a = n.args[1] if len(n.args) > 1 else None
            return n.target is _LINEAR or (isinstance(a, fx.Node) and a.op == "get_attr")

        targets = {_LINEAR, *_MATMULS}
        res = run_factorize(gm, ctx, cfg, method="svd", targets=targets, planner=_plan,
                            weight_arg=_weight_arg, prepare=prepare, node_filter=weight_is_param)
        return res
