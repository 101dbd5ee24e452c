"""AWQ: activation-aware weight quantization (Lin et al. 2024), as AutoAWQ / llm-compressor do it.

For the linears that read one activation x (q/k/v, gate/up, ...), per input channel j:
``s_j = mean|x_j|^r / mean|W~_j|^(1 - r)`` (W~: weights normalised by their group's max),
normalised to ``s / sqrt(max s * min s)``; the exponent r is searched on a grid in [0, 1) for
the smallest output error ``||x W^T - (x / s) Q(W s)^T||^2`` on calibration rows. The graph
then computes ``linear(x * (1/s), Q(W * s))`` -- the same function before rounding -- with the
salient input channels (large |x|) scaled up so they round finer. ``x * (1/s)`` is one float
``mul`` node before the linears (one per shared input; ORT and Inductor fuse it into the
producer). With ``awq_clip`` each group's clipping range is then shrunk (grid over [0.5, 1])
where that lowers the group's share of the output error (AutoAWQ's ``auto_clip``).

    s = awq_scales(x_rows, [w_q, w_k, w_v], bits=4, group_size=128)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...ir.meta import lineage, set_record
from .convert import fetch_attr, register_tensor
from .weight_only import (collect_linear_inputs, dequantize_groups, group_qparams, grouped,
                          quantize_groups, rtn, single_thread)

__all__ = ["awq_scales", "awq_clip", "awq_targets"]

aten = torch.ops.aten
_MAX_ROWS = 256  # calibration rows kept per input for the searches (AutoAWQ: 512)


def _fake_quant(w: torch.Tensor, bits: int, g: int, symmetric: bool) -> torch.Tensor:
    q, s, z = rtn(w, bits, g, symmetric)
    return dequantize_groups(q, s, z, g)


def awq_scales(x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor], *, bits: int,
               group_size: int, symmetric: bool, grid: int = 20) -> tuple[torch.Tensor, float]:
    """(per-input-channel scale s [K], best exponent r) for linears reading x [T, K]."""
    w = torch.cat(weights, 0)
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wg = grouped(w.abs(), g)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-10)).reshape(n, -1)[:, :k].mean(0)
    ref = x @ w.T
    best, best_r, best_s = float("inf"), 0.0, torch.ones(k)
    for i in range(grid):
        r = i / grid
        s = (x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out = (x / s) @ _fake_quant(w * s, bits, g, symmetric).T
        err = float((ref - out).pow(2).mean())
        if err < best:
            best, best_r, best_s = err, r, s
    return best_s, best_r


def awq_clip(x: torch.Tensor, w: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
             steps: int = 10, max_shrink: float = 0.5):
    """RTN of `w` [N, K] with each group's range shrunk to the factor in [1 - max_shrink, 1]
    that minimises that group's partial output error on x [T, K]; returns (q, scale, zp)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wg = grouped(w, g)                                            # [N, G, g], last group 0-padded
    xg = grouped(x, g)                                            # [T, G, g]
    kp = wg.shape[1] * g
    ref = torch.einsum("tgc,ngc->ngt", xg, wg)                    # per-group partial outputs
    hi0, lo0 = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_f = torch.ones(wg.shape[:2])
    for i in range(steps + 1):
        f = 1.0 - max_shrink * i / steps
        wc = torch.minimum(torch.maximum(wg, lo0 * f), hi0 * f)
        s, z = group_qparams(wc, bits, symmetric)
        dq = dequantize_groups(quantize_groups(wc.reshape(n, kp), s, z, bits, g), s, z, g)
        err = (torch.einsum("tgc,ngc->ngt", xg, dq.reshape(wg.shape)) - ref).pow(2).mean(-1)
        better = err < best_err
        best_err, best_f = torch.where(better, err, best_err), torch.where(better, f, best_f)
    wc = torch.minimum(torch.maximum(wg, lo0 * best_f[..., None]), hi0 * best_f[..., None])
    s, z = group_qparams(wc, bits, symmetric)
    return quantize_groups(wc.reshape(n, kp), s, z, bits, g)[:, :k], s, z


def _activation_stats(gm, ctx, cfg, targets):
    """Per distinct linear input: (mean |x| per channel, up to _MAX_ROWS sample rows)."""
    acc: dict[fx.Node, list] = {}

    def observe(lin, x):
        key = lin.args[0]
        a = acc.setdefault(key, [torch.zeros(x.shape[1], dtype=torch.float64), 0, []])
        a[0] += x.abs().double().sum(0)
        a[1] += x.shape[0]
        a[2].append(x)

    first = {}
    for lin in targets:
        first.setdefault(lin.args[0], lin)
    collect_linear_inputs(gm, ctx, cfg, list(first.values()), observe)
    out = {}
    for key, (s, cnt, rows) in acc.items():
        xs = torch.cat(rows, 0)
        if xs.shape[0] > _MAX_ROWS:  # evenly strided rows: deterministic, spans every batch
            xs = xs[torch.linspace(0, xs.shape[0] - 1, _MAX_ROWS).long()]
        out[key] = ((s / max(cnt, 1)).float(), xs)
    return out


def awq_targets(gm: fx.GraphModule, ctx, cfg, targets: list[fx.Node], stats: dict):
    """Scale, clip and quantize every target linear; inserts one ``x * (1/s)`` per shared input."""
    acts = _activation_stats(gm, ctx, cfg, targets)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for lin in targets:
        if lin.args[0] in acts:
            groups.setdefault(lin.args[0], []).append(lin)
    out, ratios = {}, []
    for i, (x_node, lins) in enumerate(groups.items()):
        x_mean, xs = acts[x_node]
        ws = [fetch_attr(gm, lin.args[1].target).detach().float() for lin in lins]
        with single_thread():
            s, r = awq_scales(xs, x_mean, ws, bits=cfg.bits, group_size=cfg.group_size,
                              symmetric=cfg.symmetric, grid=cfg.awq_grid)
            ratios.append(r)
            x_s = xs / s
            for lin, w in zip(lins, ws):
                if cfg.awq_clip:
                    out[lin] = awq_clip(x_s[::2], w * s, bits=cfg.bits, group_size=cfg.group_size,
                                        symmetric=cfg.symmetric)
                else:
                    out[lin] = rtn(w * s, cfg.bits, cfg.group_size, cfg.symmetric)
        inv_t = register_tensor(gm, f"_fxq_awq_inv_{i}", (1.0 / s).to(ws[0].dtype))
        with gm.graph.inserting_after(x_node):
            inv = gm.graph.get_attr(inv_t)
        with gm.graph.inserting_after(inv):
            xmul = gm.graph.call_function(aten.mul.Tensor, (x_node, inv))
        xmul.meta["val"] = x_node.meta.get("val")
        inv.meta["val"] = fetch_attr(gm, inv_t)
        lin0 = lineage(lins[0])
        if lin0 is not None:
            set_record(xmul, lin0.derived("awq_scale"))
            set_record(inv, lin0.derived("get_attr"))
        for lin in lins:
            lin.replace_input_with(x_node, xmul)
    stats["awq_ratio_mean"] = sum(ratios) / len(ratios) if ratios else 0.0
    stats["awq_scaled_inputs"] = len(groups)
    return out
