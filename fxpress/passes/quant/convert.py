"""ConvertToQDQ: replace observers / fake-quants by quantized_decomposed quantize/dequantize ops.

The output is torchao's ``convert_pt2e(fold_quantize=True)`` form (docs/CONTRACTS.md):
- weight: int8 get_attr -> dequantize_per_channel(w_int8, scales, zero_points, axis, qmin,
  qmax, int8) (scales/zero points are get_attr buffers) or dequantize_per_tensor with
  literal qparams; the weight is stored quantized, never quantized at run time;
- static activation: quantize_per_tensor(x, scale, zp, qmin, qmax, dtype) ->
  dequantize_per_tensor(...), scale/zp as Python literals;
- dynamic activation: choose_qparams.tensor -> quantize_per_tensor.tensor ->
  dequantize_per_tensor.tensor.
Observers whose every consumer was left in float (sensitivity guard) are simply removed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)
import torch.fx as fx

from ...ir.meta import (QuantAnnotation, QuantSpec, WeightForm, get_record, lineage, module_path,
                        set_record)
from ..base import Pass, PassContext, PassResult
from .insert_observers import OBSERVER_PREFIX, observer_nodes
from .weight_form import choose_form, host_features

__all__ = ["ConvertToQDQ", "constant_node", "register_tensor", "fetch_attr", "bias_scale_floor"]

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten
_WEIGHTED = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.convolution.default, aten.linear.default}


def bias_scale_floor(bias: torch.Tensor, x_scale: float, k: int, margin: float = 1.0) -> torch.Tensor:
    """Per output channel, the least weight scale `sw` at which an int8 kernel computes a layer
    whose float `bias` it holds as int32 `round(bias / (x_scale * sw))` without wrapping around.

    ORT's QLinearConv / QGemm (MLAS) add that int32 bias to the int32 sum of `k` products
    (x - zx) * w, each within 255 * 128: a bias beyond 2^31 - 1 - k * 255 * 128 saturates or
    wraps. Dead channels meet it: EfficientNet-Lite0's stem has weights ~1e-6 (scale 1.2e-7, the
    observer's floor) under a -2.0 bias, whose int32 clipped at -2^31 and wrapped around
    (5 % of the stem's outputs off by up to 85 steps, 30 dB between ORT and the IR).
    Raising such a channel's scale to the floor changes its weights by less than the floor.
    `margin` > 1 leaves slack (ConvertToQDQ: 1 %, so a lowering that reorders K, such as the
    space-to-depth stem, still fits)."""
    room = max(2 ** 31 - 1 - int(k) * 255 * 128, 2 ** 30)
    return (bias.detach().abs().double() * margin / (float(x_scale) * room)).float()


def fetch_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for p in str(target).split("."):
        obj = getattr(obj, p)
    return obj


def register_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor) -> str:
    """Register `value` as a buffer at dotted `name` (made unique); return the target."""
    owner, _, attr = name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    base, i = attr, 0
    while hasattr(mod, attr):
        i += 1
        attr = f"{base}_{i}"
    mod.register_buffer(attr, value.detach().clone())
    return f"{owner}.{attr}" if owner else attr


def constant_node(gm: fx.GraphModule, at: fx.Node, name: str, value: torch.Tensor,
                  why: str = "get_attr") -> fx.Node:
    """A get_attr of `value` (registered at dotted `name`, made unique) inserted before `at`,
    with its ``val`` and the lineage of `at` (derived as `why`)."""
    target = register_tensor(gm, name, value)
    with gm.graph.inserting_before(at):
        node = gm.graph.get_attr(target)
    node.meta["val"] = value
    lin = lineage(at)
    if lin is not None:
        set_record(node, lin.derived(why))
    return node


def _quantize_weight(w: torch.Tensor, scale, zp, spec: QuantSpec) -> torch.Tensor:
    with torch.no_grad():
        if spec.qscheme == "per_channel":
            return qd.quantize_per_channel(w, scale.float(), zp.to(torch.int64), spec.axis,
                                           spec.quant_min, spec.quant_max, torch.int8)
        return qd.quantize_per_tensor(w, float(scale), int(zp), spec.quant_min, spec.quant_max,
                                      torch.int8)


def _input_scale(gm: fx.GraphModule, x: fx.Node) -> float | None:
    """The per-tensor scale a static activation `x` (an observer, or a dequantize already
    converted) is quantized with; None for float, dynamic or per-channel inputs."""
    if x.op == "call_module" and str(x.target).startswith(OBSERVER_PREFIX):
        mod = gm.get_submodule(x.target)
        if getattr(mod, "is_dynamic", False) or mod.spec.qscheme != "per_tensor":
            return None
        return float(mod.qparams()[0])
    if x.op == "call_function" and x.target is qd.dequantize_per_tensor.default:
        return float(x.args[1])
    return None


def _bias_users(gm: fx.GraphModule, node: fx.Node):
    """(layer, its input scale) for each static int8 conv/linear reading weight observer `node`
    with a constant (get_attr) bias."""
    for u in list(node.users):
        if u.op != "call_function" or u.target not in _WEIGHTED or len(u.args) < 3 \
                or u.args[1] is not node or not isinstance(u.args[2], fx.Node) \
                or u.args[2].op != "get_attr" or not isinstance(u.args[0], fx.Node):
            continue
        sx = _input_scale(gm, u.args[0])
        if sx is not None and sx > 0:
            yield u, sx


def _bias_floor(gm: fx.GraphModule, node: fx.Node, k: int) -> torch.Tensor | None:
    """`bias_scale_floor` of every `_bias_users` layer of weight observer `node` (the largest
    where several read it); None when there is none."""
    floor = None
    for u, sx in _bias_users(gm, node):
        f = bias_scale_floor(fetch_attr(gm, u.args[2].target), sx, k, margin=1.01)
        floor = f if floor is None or floor.shape != f.shape else torch.maximum(floor, f)
    return floor


def _snap_biases(gm: fx.GraphModule, node: fx.Node, scale: torch.Tensor) -> int:
    """Put the bias of each `_bias_users` layer on its int8 kernel's int32 grid,
    ``round(b / (sx * sw)) * sx * sw`` (a new buffer ``<bias>_int32grid``): the IR then adds the
    bias ORT's QLinearConv / QGemm add, and the lowering's int32 bias is exact. Unsnapped, the
    0.5-step bias roundings flip rounding ties that a chaotic net amplifies (random HF
    MobileNetV2 with corrected biases: ORT 22.3 dB from its IR; 173 dB without biases).
    A linear on a >2-D input keeps its float bias: ORT runs it as QLinearMatMul + a float Add
    (QGemm is 2-D only), so a snapped bias would be an error the kernel does not make (real
    MiniLM static, padding=True batches: min cosine 0.9901 -> 0.9897 with it snapped)."""
    done = 0
    for u, sx in list(_bias_users(gm, node)):
        x = u.args[0].meta.get("val")
        if u.target is aten.linear.default and (not isinstance(x, torch.Tensor) or x.dim() > 2):
            continue
        b = fetch_attr(gm, u.args[2].target).detach()
        step = (sx * torch.as_tensor(scale).double().reshape(-1)).expand(b.numel()) \
            if torch.as_tensor(scale).numel() in (1, b.numel()) else None
        if step is None or b.dim() != 1:
            continue
        q = torch.round(b.double() / step).clamp(-(2 ** 31), 2 ** 31 - 1)
        snapped = (q * step).to(b.dtype)
        if torch.equal(snapped, b):
            continue
        new = constant_node(gm, u, str(u.args[2].target) + "_int32grid", snapped,
                            "get_attr:bias_int32grid")
        u.args = u.args[:2] + (new,) + u.args[3:]
        done += 1
    return done


def _fit_bias(gm, node, w, scale, zp, spec: QuantSpec):
    """(scale, channels raised): symmetric weight scales raised to `_bias_floor`."""
    if not spec.symmetric or bool(torch.as_tensor(zp).any()) or w.dim() < 2:
        return scale, 0
    floor = _bias_floor(gm, node, w[0].numel())
    if floor is None:
        return scale, 0
    if spec.qscheme != "per_channel":
        floor = floor.max()
    elif floor.numel() != torch.as_tensor(scale).numel():
        return scale, 0
    raised = int((floor > scale).sum())
    return (torch.maximum(scale.float(), floor) if raised else scale), raised


def _tag(node: fx.Node, like: fx.Node, spec: QuantSpec, what: str) -> None:
    lin = lineage(like)
    if lin is not None:
        set_record(node, lin.derived(what))
    set_record(node, spec)


def _val(node: fx.Node, like: torch.Tensor | None) -> None:
    if isinstance(like, torch.Tensor):
        node.meta["val"] = like


@dataclass(frozen=True)
class ConvertToQDQ(Pass):
    """Turn every observer/fake-quant node into quantize/dequantize ops (int8 weights stored as int8).

    weight_range: "auto" | "full" | "reduced": the int8 weight form per layer for the host's
    ISA (``weight_form.choose_form``); each weight dequantize gets a ``WeightForm`` record and
    ``ctx.report["quant_weight_forms"]`` lists them. `features`: a host feature record
    (default ``fxpress.hw.host()``).
    """

    name: ClassVar[str] = "quant_convert"
    weight_range: str = "auto"
    features: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        counts = {"weights": 0, "activations": 0, "dynamic": 0, "dropped": 0, "bias_fit": 0}
        features = self.features if self.features is not None else host_features()
        forms: list[dict] = []
        annotated = {n.name for n in graph.nodes if get_record(n, QuantAnnotation) is not None}
        for node, mod in observer_nodes(gm):
            x = node.args[0]
            if mod.consumers and not (mod.consumers & annotated):
                node.replace_all_uses_with(x)
                graph.erase_node(node)
                counts["dropped"] += 1
                continue
            spec = mod.spec
            if x.op == "get_attr":
                new, raised = self._weight(gm, node, mod, x, spec, features, self.weight_range)
                counts["weights"] += 1
                counts["bias_fit"] += raised
                f = get_record(new, WeightForm)
                forms.append({"module": module_path(new), "weight": str(x.target), "form": f.form,
                              "isa": f.isa, "reason": f.reason})
            elif getattr(mod, "is_dynamic", False):
                new = self._dynamic(graph, node, x, spec)
                counts["dynamic"] += 1
            else:
                scale, zp = mod.qparams()
                args = (float(scale), int(zp), spec.quant_min, spec.quant_max, spec.torch_dtype)
                with graph.inserting_before(node):
                    q = graph.call_function(qd.quantize_per_tensor.default, (x,) + args)
                    new = graph.call_function(qd.dequantize_per_tensor.default, (q,) + args)
                _tag(q, x, spec, "quantize")
                _tag(new, x, spec, "dequantize")
                stats = mod.stats() if mod.num_batches else None
                if stats is not None:
                    set_record(q, stats)
                _val(new, x.meta.get("val"))
                counts["activations"] += 1
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        for n in graph.nodes:  # annotations are consumed: the IR now says it with ops
            if get_record(n, QuantAnnotation) is not None:
                from ...ir.meta import drop_record
                drop_record(n, QuantAnnotation)
        graph.lint()
        from ..cleanup.dce import remove_unused_attributes
        graph.eliminate_dead_code()
        remove_unused_attributes(gm)
        gm.recompile()
        if forms:
            ctx.report["quant_weight_forms"] = forms
            counts["forms"] = {k: sum(r["form"] == k for r in forms)
                               for k in sorted({r["form"] for r in forms})}
        return PassResult(gm, any(counts.values()), counts)

    @staticmethod
    def _weight(gm, node, mod, x, spec, features, policy):
        graph = gm.graph
        w = fetch_attr(gm, x.target).detach()
        learned = getattr(mod, "learned", False)
        if not learned:
            mod.reset()      # weights need no calibration data: observe the final value now
            mod.observe(w)
        scale, zp = mod.qparams()
        stats = mod.stats()
        wq = _quantize_weight(w, scale, zp, spec)
        # QAT weights (LSQ-learned or fake-quantized while training) were trained on this grid:
        # never requantize them to 7 bits behind the user's back
        trained = learned or hasattr(mod, "_fq_init")
        form = choose_form(wq, features, "full" if trained and policy == "auto" else policy,
                           axis=spec.axis,
                           symmetric=spec.symmetric and not bool(torch.as_tensor(zp).any()))
        if form.form == "s7" and not spec.reduce_range and not trained:
            from .observers import make_observer
            spec = replace(spec, reduce_range=True)
            obs7 = make_observer(spec, x.name, weight=True)
            obs7.observe(w)
            scale, zp = obs7.qparams()
            stats = obs7.stats()
            wq = _quantize_weight(w, scale, zp, spec)
        # the int32 bias of the int8 kernel must fit: raise the scale of channels where not
        scale, raised = _fit_bias(gm, node, w, scale, zp, spec)
        if raised:
            wq = _quantize_weight(w, scale, zp, spec)
        _snap_biases(gm, node, scale)
        base = str(x.target)
        wq_t = register_tensor(gm, base + "_int8", wq)
        with graph.inserting_before(node):
            wq_n = graph.get_attr(wq_t)
            if spec.qscheme == "per_channel":
                s_n = graph.get_attr(register_tensor(gm, base + "_scale", scale.float()))
                z_n = graph.get_attr(register_tensor(gm, base + "_zero_point", zp.to(torch.int64)))
                new = graph.call_function(qd.dequantize_per_channel.default,
                                          (wq_n, s_n, z_n, spec.axis, spec.quant_min,
                                           spec.quant_max, torch.int8))
                for a in (s_n, z_n):
                    _tag(a, x, spec, "get_attr")
            else:
                new = graph.call_function(qd.dequantize_per_tensor.default,
                                          (wq_n, float(scale), int(zp), spec.quant_min,
                                           spec.quant_max, torch.int8))
        _tag(wq_n, x, spec, "get_attr:int8")
        _tag(new, x, spec, "dequantize")
        set_record(new, stats)
        set_record(new, form)
        wq_n.meta["val"] = wq
        _val(new, x.meta.get("val"))
        return new, raised

    @staticmethod
    def _dynamic(graph, node, x, spec):
        choose = qd.choose_qparams_symmetric.tensor if spec.symmetric else qd.choose_qparams.tensor
        eps = torch.finfo(torch.float32).eps
        qmin, qmax, dt = spec.quant_min, spec.quant_max, spec.torch_dtype
        with graph.inserting_before(node):
            cq = graph.call_function(choose, (x, qmin, qmax, eps, dt))
            s = graph.call_function(operator.getitem, (cq, 0))
            z = graph.call_function(operator.getitem, (cq, 1))
            q = graph.call_function(qd.quantize_per_tensor.tensor, (x, s, z, qmin, qmax, dt))
            new = graph.call_function(qd.dequantize_per_tensor.tensor, (q, s, z, qmin, qmax, dt))
        for n in (cq, s, z, q, new):
            _tag(n, x, spec, "dynamic_quant")
        _val(new, x.meta.get("val"))
        return new
