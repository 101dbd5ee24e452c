"""True-sequential GPTQ: each linear's Hessian from activations that already went through the
quantized linears before it (AutoGPTQ's / llm-compressor's order), not from the float model.

Every calibration batch runs through the IR in lockstep, one node at a time (one
``fx.Interpreter`` environment per batch, values freed after their last use). At the first target
linear that reads a tensor, ``H = 2 X^T X / n`` is summed over every batch's value of that tensor,
each linear reading it is quantized (``quantize(linear, H)`` returns its dequantized weight) and
from then on its weight ``get_attr`` yields the dequantized weight in every batch, so later
layers see the quantized model's activations. Memory: all batches' live activations at once
(the IR's KV outputs stay alive to the end: ~12 MB per 256-token batch on SmolLM2-135M).

    sequential_gptq(gm, ctx, cfg, targets, quantize)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import CalibrationError
from .weight_only import flat_calibration

__all__ = ["sequential_gptq"]


def _hessian(xs: list[torch.Tensor]) -> torch.Tensor:
    h, n = None, 0
    for x in xs:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        h = 2.0 * x.T @ x if h is None else h + 2.0 * x.T @ x
        n += x.shape[0]
    return h / max(n, 1)


@torch.no_grad()
def sequential_gptq(gm: fx.GraphModule, ctx, cfg, targets: list[fx.Node], quantize) -> int:
    """Quantize `targets` in graph order, each from the quantized prefix's activations; returns
    the number of calibration batches. `quantize(lin, H float64 [K, K])` -> dequantized weight."""
    runners = []
    for flat in flat_calibration(gm, ctx, cfg):
        r = fx.Interpreter(gm)
        r.env, r.args_iter = {}, iter(flat)
        runners.append(r)
    if not runners:
        raise CalibrationError("calibration is empty: the iterable gave no batches")
    tset = set(targets)
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for lin in targets:
        by_input.setdefault(lin.args[0], []).append(lin)
    replaced: dict[fx.Node, torch.Tensor] = {}
    for node in gm.graph.nodes:
        lins = by_input.pop(node.args[0], None) if node in tset else None
        if lins:
            h = _hessian([r.env[node.args[0]] for r in runners])
            for lin in lins:
                w_node = lin.args[1]
                dq = quantize(lin, h)
                replaced[w_node] = dq.to(runners[0].fetch_attr(w_node.target).dtype)
                for r in runners:
                    if w_node in r.env:
                        r.env[w_node] = replaced[w_node]
        for r in runners:
            r.env[node] = replaced[node] if node in replaced else r.run_node(node)
            for dead in r.user_to_last_uses.get(node, []):
                del r.env[dead]
    return len(runners)
