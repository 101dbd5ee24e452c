"""SmoothQuant: move activation outliers into the weights before linears are quantized.

For the linears reading one activation x (e.g. q/k/v after a LayerNorm), per input channel j:
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``; the graph then computes
``linear(x / s, W * s)`` - the same function - whose activation has flat channels that a
per-tensor int8 range holds well (Xiao et al. 2023). ``x / s`` is one float ``mul`` node
before the quantize (Inductor fuses it into the quantize kernel); the weights are rescaled
in place. Activation channel maxima come from the calibration batches (under a process group:
each rank's shard, the maxima reduced over the ranks, so every rank rescales alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ... import distributed
from ...errors import InputError
from ...ir.meta import lineage, module_path, set_record
from ..base import Pass, PassContext, PassResult
from .calibrate import calibration_batches, check_batch
from .convert import fetch_attr, register_tensor
from .observers import _fake

__all__ = ["SmoothQuant"]

aten = torch.ops.aten


class _ChannelAbsMax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.amax = None

    def forward(self, x):
        if not _fake(x):
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0)
            self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        return x


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Rescale linear inputs/weights per input channel (x/s, W*s) so activations quantize per-tensor."""

    name: ClassVar[str] = "quant_smooth"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        transformer = any(n.target is aten.layer_norm.default for n in gm.graph.nodes)
        alpha = cfg.smooth_alpha(transformer)
        if alpha is None:
            return PassResult(gm, False, {"smoothed": 0, "alpha": None})
        groups: dict[fx.Node, list[fx.Node]] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is aten.linear.default \
                    and isinstance(n.args[0], fx.Node) and n.args[1].op == "get_attr" \
                    and not cfg.skipped(module_path(n)):
                groups.setdefault(n.args[0], []).append(n)
        # a weight read elsewhere too (tied) cannot be rescaled for this group alone
        groups = {x: ls for x, ls in groups.items() if all(len(lin.args[1].users) == 1 for lin in ls)
                  and len({lin.args[1] for lin in ls}) == len(ls)}
        if not groups:
            return PassResult(gm, False, {"smoothed": 0})
        # "auto" in dynamic mode may have no calibration: the example inputs then, when they are
        # the IR's positional inputs (a keyword-captured model's example is not: no smoothing)
        batches = list(calibration_batches(ctx, cfg, required=cfg.smooth != "auto"))
        if cfg.smooth == "auto" and ctx.calibration is None:
            try:
                for i, b in batches:
                    check_batch(gm, b, i)
            except InputError:
                return PassResult(gm, False, {"smoothed": 0, "alpha": alpha,
                                              "why": "no calibration batches (keyword example)"})
        probes = {}
        for i, x in enumerate(groups):
            target = f"_fxq_smooth_probe_{i}"
            gm.add_submodule(target, _ChannelAbsMax())
            with gm.graph.inserting_after(x):
                probes[x] = gm.graph.call_module(target, (x,))
        gm.recompile()
        with torch.no_grad():
            for i, b in batches:
                check_batch(gm, b, i)
                gm(*b)
        maxima = {x: gm.get_submodule(p.target).amax for x, p in probes.items()}
        w = distributed.world()
        if w is not None:  # a rank with an empty shard (None) contributes nothing
            per_rank = distributed.gather(list(maxima.values()), w)
            for j, x in enumerate(maxima):
                seen = [r[j] for r in per_rank if r[j] is not None]
                maxima[x] = torch.stack(seen).amax(0) if seen else None
        smoothed = 0
        for x, linears in groups.items():
            p = probes[x]
            amax = maxima[x]
            gm.graph.erase_node(p)
            delattr(gm, str(p.target))
            if amax is None:
                continue
            ws = [fetch_attr(gm, lin.args[1].target) for lin in linears]
            wmax = torch.stack([w.detach().abs().amax(0) for w in ws]).amax(0)
            s = (amax.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            inv_t = register_tensor(gm, f"_fxq_smooth_inv_{x.name}", (1.0 / s).to(ws[0].dtype))
            with gm.graph.inserting_after(x):
                inv = gm.graph.get_attr(inv_t)
            with gm.graph.inserting_after(inv):
                xs = gm.graph.call_function(aten.mul.Tensor, (x, inv))
            for lin in linears:
                lin.replace_input_with(x, xs)
                with torch.no_grad():
                    ws[linears.index(lin)].mul_(s)  # W[:, j] * s_j: the IR owns its params
            lin0 = lineage(linears[0])
            if lin0 is not None:
                set_record(xs, lin0.derived("smoothquant_scale"))
                set_record(inv, lin0.derived("get_attr"))
            xs.meta["val"] = x.meta.get("val")
            smoothed += 1
        gm.graph.lint()
        gm.recompile()
        return PassResult(gm, smoothed > 0, {"smoothed": smoothed, "alpha": alpha})
