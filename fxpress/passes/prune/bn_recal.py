"""Batch-norm re-estimation: recompute every eval-mode BN's running statistics on data.

After channels are removed, the channels that stay see inputs of another distribution (the
layer before them lost inputs too), while their BN still normalizes with the unpruned
model's running mean and variance. Re-estimating those statistics on a few batches (the
"adaptive BN" of EagleEye, NNI's BN recalibration) restores much of the accuracy before
any training. The graph runs node by node; each BN normalizes its input with the batch's
statistics (as a BN in train mode does) and accumulates them; afterwards each BN's
``running_mean`` / ``running_var`` are the averages over the batches (cumulative moving
average, PyTorch's ``momentum=None``).

    recalibrate_bn(gm, batches)        # in place; returns {"bn_nodes": 49, "batches": 8}
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from ...errors import CalibrationError
from ...utils import iter_batches
from .channel_removal import set_tensor

__all__ = ["recalibrate_bn", "bn_nodes"]

aten = torch.ops.aten
# (op, index of running_mean, index of running_var, index of eps)
_BN = {aten.batch_norm.default: (3, 4, 7),
       aten._native_batch_norm_legit_no_training.default: (3, 4, 6)}


def bn_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The eval-mode batch-norm nodes whose running statistics are graph attributes."""
    out = []
    for n in gm.graph.nodes:
        spec = _BN.get(n.target) if n.op == "call_function" else None
        if spec is None:
            continue
        if n.target is aten.batch_norm.default and n.args[5]:
            continue  # already in training mode: nothing to re-estimate
        rm, rv = n.args[spec[0]], n.args[spec[1]]
        if isinstance(rm, fx.Node) and isinstance(rv, fx.Node) and rm.op == rv.op == "get_attr":
            out.append(n)
    return out


class _Recorder(fx.Interpreter):
    """Runs the graph with batch statistics at every BN in `nodes`, summing them per node."""

    def __init__(self, gm: fx.GraphModule, nodes: list[fx.Node]):
        super().__init__(gm)
        self.nodes = set(nodes)
        self.sums: dict[fx.Node, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n not in self.nodes:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        x, w, b = args[0], args[1], args[2]
        eps = args[_BN[n.target][2]]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        count = x.numel() // x.shape[1]
        unbiased = var * count / max(count - 1, 1)
        acc = self.sums.setdefault(n, [torch.zeros_like(mean), torch.zeros_like(var), 0])
        acc[0] += mean
        acc[1] += unbiased
        acc[2] += 1
        y = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=eps)
        if n.target is aten._native_batch_norm_legit_no_training.default:
            return (y, mean.new_empty(0), mean.new_empty(0))
        return y


@torch.no_grad()
def recalibrate_bn(gm: fx.GraphModule, batches: Iterable | None, max_batches: int = 32) -> dict:
    """Re-estimate the running statistics of every eval-mode BN of `gm` in place.

    `batches` are input tuples (or tensors) as calibration takes them; labels are ignored.
    Returns {"bn_nodes": how many BNs were re-estimated, "batches": batches used}.
    """
    nodes = bn_nodes(gm)
    n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    data = list(iter_batches(batches, n_in))[:max_batches]
    if not data:
        raise CalibrationError("BN re-estimation needs calibration batches")
    if not nodes:
        return {"bn_nodes": 0, "batches": 0}
    rec = _Recorder(gm, nodes)
    for batch in data:
        rec.run(*batch)
    for n, (mean_sum, var_sum, k) in rec.sums.items():
        i_m, i_v, _ = _BN[n.target]
        set_tensor(gm, n.args[i_m].target, mean_sum / k)
        set_tensor(gm, n.args[i_v].target, var_sum / k)
    return {"bn_nodes": len(rec.sums), "batches": len(data)}
