"""BiasCorrection: empirical bias correction of int8 convs/linears on the calibration data.

Quantized weights and activations shift the mean of a layer's output (Nagel et al. 2019,
"Data-Free Quantization"; NNCF's fast bias correction): ``E[y_q] != E[y_fp]``, most of all in
depthwise convs whose 9 weights per channel round coarsely. Runs after Calibrate, before
ConvertToQDQ: the observed graph, observers as identities, is the float model; a converted
copy is the int8 model. Both are executed node by node on the calibration batches; at each
int8 conv / linear (topological order) the per-output-channel mean difference
``E[y_fp] - E[y_q]`` is added to its bias (in the IR and the copy) and the copy's output
shifted before later layers read it, so each correction sees the earlier ones (sequential, as
AIMET's empirical bias correction). Per-layer rows (shift, output SQNR vs
float before and after) land in ``report["bias_correction"]``.

    fxpress.Quantize(mode="static", bias_correction=True)

The default, ``bias_correction="auto"``, runs it on static graphs with a depthwise conv and
calibration data (`auto_skip` says why not elsewhere: the pass's stats["skipped"]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401
import torch.fx as fx

from ...ir.meta import module_path
from ..base import Pass, PassContext, PassResult
from .calibrate import calibration_batches, check_batch
from .convert import constant_node, fetch_attr

__all__ = ["BiasCorrection", "QUANTIZE_OPS", "DEQUANTIZE_OPS", "auto_skip", "depthwise_convs"]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
QUANTIZE_OPS = {qd.quantize_per_tensor.default, qd.quantize_per_channel.default,
                qd.quantize_per_tensor.tensor, qd.quantize_per_tensor.tensor2}
DEQUANTIZE_OPS = {qd.dequantize_per_tensor.default, qd.dequantize_per_channel.default,
                  qd.dequantize_per_tensor.tensor, qd.dequantize_per_tensor.tensor2}
_LAYERS = {aten.conv1d.default: 1, aten.conv2d.default: 1, aten.conv3d.default: 1,
           aten.linear.default: -1}


def _quantized_layer(n: fx.Node) -> bool:
    """An int8 conv/linear: its weight is a dequantize node."""
    return (n.op == "call_function" and n.target in _LAYERS and len(n.args) > 1
            and isinstance(n.args[1], fx.Node) and n.args[1].target in DEQUANTIZE_OPS)


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum().clamp_min(1e-30)))


class _Runner:
    """Runs a graph node by node on a list of batches, freeing values after their last use.

    `float_mode`: observers and quantize / dequantize pairs are identities (the float model)."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple], *, float_mode: bool):
        self.gm, self.batches, self.float_mode = gm, batches, float_mode
        self.nodes = list(gm.graph.nodes)
        self.placeholders = {p: j for j, p in enumerate(n for n in self.nodes if n.op == "placeholder")}
        self.last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last[a] = i
        self.env: dict[fx.Node, list] = {}

    def _value(self, n: fx.Node, k: int):
        env = self.env
        if n.op == "placeholder":
            return self.batches[k][self.placeholders[n]]
        if n.op == "get_attr":
            return fetch_attr(self.gm, n.target)
        if self.float_mode and (n.op == "call_module" or n.target in QUANTIZE_OPS or (
                n.target in DEQUANTIZE_OPS and isinstance(n.args[0], fx.Node)
                and n.args[0].target in QUANTIZE_OPS)):
            return env[n.args[0]][k]                    # observer / q / dq(q(x)): identity
        args = fx.node.map_arg(n.args, lambda a: env[a][k])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a][k])
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        return n.target(*args, **kwargs)

    def run(self, visit=None) -> None:
        """Execute every node; ``visit(node, values)`` after each quantized conv/linear."""
        for i, n in enumerate(self.nodes):
            if n.op == "output":
                continue
            self.env[n] = [self._value(n, k) for k in range(len(self.batches))]
            if visit is not None and n.op == "call_function" and n.target in _LAYERS:
                visit(n)
            for a in [a for a in self.env if self.last.get(a, -1) <= i]:
                del self.env[a]


def _channel_mean(ys: list[torch.Tensor], axis: int) -> torch.Tensor:
    dims = lambda y: [d for d in range(y.dim()) if d != axis % y.dim()]  # noqa: E731
    total = sum(y.double().sum(dims(y)) for y in ys)
    count = sum(y.numel() // y.shape[axis] for y in ys)
    return (total / count).float()


@dataclass(frozen=True)
class BiasCorrection(Pass):
    """Add E[y_fp] - E[y_q] (per output channel, on the calibration data) to each int8 layer's bias.

    Runs after Calibrate, before ConvertToQDQ: the observed graph is the float model (observers
    as identities); a converted copy is the int8 model the real conversion will produce (the
    same weights and qparams: conversion is deterministic, a bias is not quantized)."""

    name: ClassVar[str] = "quant_bias_correction"
    config: Any = None
    auto: bool = False   # Quantize(bias_correction="auto"): only where `auto_skip` finds no reason

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        import copy

        from .convert import ConvertToQDQ
        cfg = self.config
        why = auto_skip(gm, ctx, cfg) if self.auto else None
        if why is not None:
            ctx.report["bias_correction"] = []
            return PassResult(gm, False, {"corrected": 0, "skipped": why})
        batches = []
        for i, b in calibration_batches(ctx, cfg, required=True):
            batches.append(tuple(check_batch(gm, b, i)))  # flat, placeholder order (dict batches too)
        qgm = copy.deepcopy(gm)
        ConvertToQDQ(weight_range=cfg.weight_range if cfg is not None else "auto").run(
            qgm, PassContext(example_inputs=ctx.example_inputs))
        layers = {n.name: n for n in qgm.graph.nodes if _quantized_layer(n)}
        fp_means, fp_vals = {}, {}
        with torch.no_grad():
            fp = _Runner(gm, batches, float_mode=True)

            def keep(n):
                if n.name in layers:
                    fp_means[n.name] = _channel_mean(fp.env[n], _LAYERS[n.target])
                    fp_vals[n.name] = torch.cat([y.flatten() for y in fp.env[n]])
            fp.run(keep)
            rows: list[dict] = []
            q = _Runner(qgm, batches, float_mode=False)
            q.run(lambda n: self._correct(gm, qgm, q, n, fp_means, fp_vals, rows)
                  if n.name in fp_means else None)
        if rows:
            gm.graph.lint()
            gm.recompile()
        ctx.report["bias_correction"] = rows
        return PassResult(gm, bool(rows), {"corrected": len(rows)})

    @staticmethod
    def _correct(gm, qgm, run: _Runner, n: fx.Node, fp_means, fp_vals, rows: list) -> None:
        axis = _LAYERS[n.target]
        ys = run.env[n]
        shift = fp_means[n.name] - _channel_mean(ys, axis)
        if not torch.isfinite(shift).all():
            return
        node = next((m for m in gm.graph.nodes if m.name == n.name), None)
        if node is None or not _add_to_bias(gm, node, shift) or not _add_to_bias(qgm, n, shift):
            return
        view = [1] * ys[0].dim()
        view[axis] = -1
        before = _sqnr(fp_vals[n.name], torch.cat([y.flatten() for y in ys]))
        run.env[n] = [y + shift.reshape(view) for y in ys]   # later layers see the correction
        after = _sqnr(fp_vals[n.name], torch.cat([y.flatten() for y in run.env[n]]))
        rows.append({"layer": module_path(node) or node.name, "max_abs_shift": float(shift.abs().max()),
                     "sqnr_before_db": round(before, 2), "sqnr_after_db": round(after, 2)})


def _groups(n: fx.Node) -> int:
    if n.target is aten.convolution.default:
        return int(n.args[8]) if len(n.args) > 8 else 1
    return int(n.args[6]) if len(n.args) > 6 else int(n.kwargs.get("groups", 1))


def depthwise_convs(gm: fx.GraphModule) -> int:
    """Convs with one input channel per group (groups > 1) whose weight is a constant."""
    count = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.conv1d.default, aten.conv2d.default,
                                                       aten.conv3d.default, aten.convolution.default):
            continue
        w = n.args[1] if len(n.args) > 1 else None
        while isinstance(w, fx.Node) and w.op != "get_attr" and w.args:  # observer / dequantize
            w = w.args[0]
        if isinstance(w, fx.Node) and w.op == "get_attr" and _groups(n) > 1 \
                and fetch_attr(gm, w.target).shape[1] == 1:
            count += 1
    return count


def auto_skip(gm: fx.GraphModule, ctx: PassContext, cfg: Any = None) -> str | None:
    """Why `bias_correction="auto"` leaves `gm` alone, or None to correct it.

    On: static graphs with a depthwise conv, where 9 (or 25) int8 weights per channel shift the
    output mean most (measured, real EfficientNet-Lite0 on 96 real-photo crops: the IR's logits
    17.7 -> 24.0 dB vs fp32, top-1 agreement 90.6 -> 94.8 %; CLE alone 17.6 dB: it stays opt-in).
    Off without calibration data (the example is too few samples for a mean) and under a process
    group (ranks would correct on different shards). With AdaRound on this pass is not scheduled:
    AdaRound corrects inside its own sweep against the float weights (passes/quant/adaround.py;
    a correction after it read the rounded grid as its reference: 27.4 -> 22.0 dB measured)."""
    from ... import distributed
    if ctx.calibration is None:
        return "no calibration data"
    if distributed.world() is not None:
        return "under a process group"
    if not depthwise_convs(gm):
        return "no depthwise conv"
    return None


def _add_to_bias(gm: fx.GraphModule, n: fx.Node, shift: torch.Tensor) -> bool:
    """bias += shift on `n` (a conv/linear), as a new buffer beside its weight."""
    args = list(n.args) + [None] * (3 - len(n.args))
    bias = args[2]
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return False                                    # a computed bias: leave it
    old = fetch_attr(gm, bias.target) if bias is not None else torch.zeros_like(shift)
    new_bias = old.detach() + shift.to(old.dtype)
    args[2] = constant_node(gm, n, f"{_owner(n.args[1])}bias_corrected", new_bias,
                            "get_attr:bias_corrected")
    n.args = tuple(args)
    return True


def _owner(w: fx.Node) -> str:
    """'<module>.' of the weight a dequantize reads (so the new bias sits beside it)."""
    src = w
    while isinstance(src, fx.Node) and src.op != "get_attr" and src.args:
        src = src.args[0]
    if isinstance(src, fx.Node) and src.op == "get_attr":
        owner = str(src.target).rpartition(".")[0]
        return owner + "." if owner else ""
    return ""
