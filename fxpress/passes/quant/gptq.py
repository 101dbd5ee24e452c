"""GPTQ: quantize a linear's weight column by column, compensating each column's rounding
error in the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ``||X W^T - X Q^T||^2`` (H = 2 X^T X / n from calibration activations).

Follows AutoGPTQ's / llm-compressor's ``fasterquant``: dead input channels zeroed, damping
``damp * mean(diag H)`` on the diagonal, the upper Cholesky factor of H^-1, lazy batch updates
in blocks of `block` columns, group scales computed when a group's first column is reached
(from the already-compensated weights); with ``act_order`` columns go in decreasing diag(H)
order and group scales are fixed up front from the original weights ("static groups"), so the
stored layout stays the standard [N, K/g] one and no g_idx is needed.

    q, scale, zp = gptq_quantize(w, hessian, bits=4, group_size=128)

Activations come from one pass of the calibration batches through the float IR; linears that
read the same tensor (q/k/v, gate/up) share one Hessian.
"""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from .convert import fetch_attr
from .scale_search import qparams
from .weight_only import (collect_linear_inputs, dequantize_groups, grouped, qrange,
                          single_thread)

__all__ = ["gptq_quantize", "gptq_targets", "hessians"]


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int,
                  symmetric: bool = True, damp: float = 0.01, act_order: bool = False,
                  block: int = 128, scale_search: str = "minmax"):
    """(q int8 [N, K], scale [N, ceil(K/g)], zp int8 [N, ceil(K/g)]) of `w` [N, K] given H [K, K].

    `scale_search` "mse": each group's clipping ratio minimises its rounding error weighted by
    diag(H) (fxpress.passes.quant.scale_search), for static and dynamic groups alike."""
    w = w.detach().clone().float()
    h = hessian.detach().clone().float()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = act_order or group_size == -1
    imp = torch.diag(h)[None] if scale_search == "mse" else None  # [1, K]: per-column weight
    qp = functools.partial(qparams, bits=bits, symmetric=symmetric, search=scale_search)
    if static:  # scales from the original weights, in the original column order
        scale, zp = qp(grouped(w, group_size),
                       importance=None if imp is None else grouped(imp, group_size))
    else:  # a last partial group (K not a multiple of g) is scaled from its real columns
        scale = torch.zeros(n, -(-k // g), dtype=w.dtype)
        zp = torch.zeros(n, -(-k // g), dtype=torch.int8)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even after damping: a stronger damp
        h += 0.1 * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=torch.int8)
    with single_thread():
        _columns(w, hinv, q, scale, zp, perm, g, static, bits, symmetric, block, qp, imp)
    return q, scale.float(), zp


def _columns(w, hinv, q, scale, zp, perm, g, static, bits, symmetric, block, qp, imp):
    """GPTQ's lazy-batch column loop, in place on w (compensated) / q / scale / zp."""
    k = w.shape[1]
    qmin, qmax = qrange(bits)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not static and col % g == 0:  # first column of a group: its scale from W now
                s_, z_ = qp(w1[:, i:i + g] if i + g <= i2 - i1 else
                            torch.cat([w1[:, i:], w[:, i2:i1 + i + g]], 1),
                            importance=None if imp is None else imp[:, col:col + g])
                scale[:, grp], zp[:, grp] = s_, z_
            s, z = scale[:, grp], zp[:, grp].float()
            qc = (torch.round(w1[:, i] / s) + z).clamp(qmin, qmax)
            q[:, col] = qc.to(torch.int8)
            e = (w1[:, i] - (qc - z) * s) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]


def hessians(gm: fx.GraphModule, ctx, cfg, targets: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """H = 2 X^T X / n per distinct linear input (shared by linears that read the same tensor)."""
    acc: dict[fx.Node, list] = {}

    def observe(lin, x):
        key = lin.args[0]
        if key not in acc:
            acc[key] = [torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64), 0]
        xd = x.double()
        acc[key][0] += 2.0 * xd.T @ xd
        acc[key][1] += x.shape[0]

    # linears reading one tensor: observe it once per batch
    first = {}
    for lin in targets:
        first.setdefault(lin.args[0], lin)
    collect_linear_inputs(gm, ctx, cfg, list(first.values()), observe)
    return {lin: acc[lin.args[0]][0] / max(acc[lin.args[0]][1], 1)
            for lin in targets if lin.args[0] in acc}


def gptq_targets(gm: fx.GraphModule, ctx, cfg, targets: list[fx.Node], stats: dict):
    """Quantize every target linear with GPTQ (true-sequential with ``cfg.sequential``); stats
    get the mean relative output error on the calibration data."""
    out, errs = {}, []

    def quantize(lin, h):
        w = fetch_attr(gm, lin.args[1].target).detach().float()
        q, scale, zp = gptq_quantize(w, h, bits=cfg.bits, group_size=cfg.group_size,
                                     symmetric=cfg.symmetric, damp=cfg.damp,
                                     act_order=cfg.act_order, block=cfg.block,
                                     scale_search=cfg.scale_search)
        out[lin] = (q, scale, zp)
        dq = dequantize_groups(q, scale, zp, cfg.group_size)
        d, wd, hd = (dq - w).double(), w.double(), h.double()
        # tr(D H D^T) / tr(W H W^T): the layer's relative output error on the calibration data
        errs.append(float(torch.einsum("nk,kl,nl->", d, hd, d) /
                          torch.einsum("nk,kl,nl->", wd, hd, wd).clamp(min=1e-30)))
        return dq

    if cfg.sequential:
        from .gptq_seq import sequential_gptq
        sequential_gptq(gm, ctx, cfg, targets, quantize)
    else:
        for lin, h in hessians(gm, ctx, cfg, targets).items():
            quantize(lin, h)
    stats["gptq_rel_output_error"] = sum(errs) / len(errs) if errs else 0.0
    return out
