"""ONNX-level rewrites that put torchlib's Q/DQ graph into the form ORT's int8 kernels fuse.

ORT's QDQ selectors (onnxruntime/core/optimizer/qdq_transformer/selectors_actions) turn
``DQ(x) + DQ(w) [+ DQ(bias int32)] -> Conv/Gemm/MatMul -> Q`` into QLinearConv / QGemm /
QLinearMatMul only when the weight is an int8 *initializer* read by the DQ directly and the
bias (if any) is int32 with scale sx * sw. torchlib's graph is close; each rule here fixes one
difference and counts its hits (`optimize_qdq` returns them):

- ``weight_transpose``: torchlib writes a 3-D linear as ``MatMul(x, Transpose(DQ(w)))``; the
  Transpose between DQ and MatMul blocks the fusion, so the int8 initializer is transposed here.
- ``dynamic_matmul``: ``DynamicQuantizeLinear -> Q -> DQ -> MatMul(+ bias Add)`` with an int8
  weight becomes one com.microsoft DynamicQuantizeMatMul (u8 x s8, quantizes rows on the fly).
- ``bias_int32``: a float bias of a static int8 Conv/Gemm becomes DQ(int32, sx * sw).
- ``global_avg_pool``: ReduceMean over H, W (how torchlib writes adaptive_avg_pool2d(x, 1))
  becomes GlobalAveragePool, which ORT has an int8 kernel for.
- ``pad_into_conv``: ``Pad(u8, zero point) -> DQ -> Conv`` (the space-to-depth stem,
  backends/stem.py) and ``DQ -> Pad(0.0) -> Conv`` become the Conv's own pads, so the
  QLinearConv fusion sees DQ -> Conv (padding with the zero point is padding with 0.0).
- ``space_to_depth``: torchlib's pixel_unshuffle (Reshape -> 6-D Transpose -> Reshape, 0.85 ms
  on a u8 224² image in ORT's generic Transpose) feeding one int8 Conv becomes SpaceToDepth
  (its DCR channel order) with the conv weight's input channels permuted to match.
- ``weights_u8``: int8 weights shifted to uint8 (q + 128, zp + 128: the same values) where the
  CPU needs it (`int8_weights`, see `shift_weights`).

    model, hits = optimize_qdq(model, int8_weights="auto")
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fuse_conv import pad_into_conv, space_to_depth
from .qdq import S8_EXACT_MAX

__all__ = ["optimize_qdq", "shift_weights"]
_MS = "com.microsoft"


def node_attr(node, name: str, default=None):
    """The value of attribute `name` of an ONNX node, or `default`."""
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


class _Graph:
    """Producer/consumer index over a GraphProto; constants from initializers or Constant nodes."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.g = model, model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.reindex()
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in
                      list(self.g.value_info) + list(self.g.input) + list(self.g.output)
                      if v.type.tensor_type.HasField("shape")}
        self._n = 0

    def swap(self, old, new) -> None:
        """Put `new` where `old` stands (keeping its doc string: the source location) and drop `old`."""
        new.doc_string = old.doc_string
        self.g.node.insert(list(self.g.node).index(old), new)
        self.g.node.remove(old)

    def reindex(self):
        self.prod = {o: n for n in self.g.node for o in n.output}
        self.cons = collections.defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.cons[i].append(n)
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str):
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.prod.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t) if p.attribute[0].name == "value" else None
        return None

    def add_init(self, arr: np.ndarray, hint: str) -> str:
        self._n += 1
        name = f"fx_{hint}_{self._n}"
        t = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def only_user(self, name: str, node) -> bool:
        return name not in self.outputs and [id(n) for n in self.cons[name]] == [id(node)]

    def weight_dq(self, name: str):
        """(DQ node, int array, scale array, zp array, axis) when `name` is DQ(int initializer)."""
        dq = self.prod.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            return None
        q, s, z = (self.const(i) for i in dq.input[:3])
        if q is None or s is None or z is None or q.dtype not in (np.int8, np.uint8) \
                or dq.input[0] not in self.inits:
            return None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        return dq, q, s, z, (axis if s.size > 1 else None)

    def drop_shape(self, name: str) -> None:
        """Forget the recorded shape of `name` (a rewrite changed it)."""
        for v in [v for v in self.g.value_info if v.name == name]:
            self.g.value_info.remove(v)

    def attr(self, node, name, default=None):
        return node_attr(node, name, default)

    def replace_uses(self, old: str, new: str):
        for n in self.g.node:
            for k, i in enumerate(n.input):
                if i == old:
                    n.input[k] = new
        for o in self.g.output:  # keep graph output names: feed them through an Identity
            if o.name == old:
                self.g.node.append(helper.make_node("Identity", [new], [old]))

    def prune(self):
        live = {o.name for o in self.g.output}
        keep = []
        for n in reversed(self.g.node):
            if any(o in live for o in n.output):
                keep.append(n)
                live.update(i for i in n.input if i)
        del self.g.node[:]
        self.g.node.extend(reversed(keep))
        inits = [i for i in self.g.initializer if i.name in live]
        del self.g.initializer[:]
        self.g.initializer.extend(inits)
        self.inits = {i.name: i for i in self.g.initializer}  # extend() copied the protos
        self.reindex()


def _weight_transpose(g: _Graph) -> int:
    hits = 0
    for t in list(g.g.node):
        if t.op_type != "Transpose" or list(g.attr(t, "perm", [])) != [1, 0]:
            continue
        found = g.weight_dq(t.input[0])
        # a DQ shared with other readers (a tied lm_head / embedding) stays for them; the
        # transposed copy feeds the MatMul (prune drops the old DQ when nothing else reads it)
        if found is None or found[1].ndim != 2:
            continue
        dq, q, s, z, axis = found
        attrs = {} if axis is None else {"axis": 1 - axis}
        new = helper.make_node("DequantizeLinear", [g.add_init(q.T, "w_t"), dq.input[1], dq.input[2]],
                               [t.output[0]], name=f"{dq.name}_t", **attrs)
        new.doc_string = dq.doc_string
        g.g.node.insert(list(g.g.node).index(t), new)  # dq's source line, not the transpose's
        g.g.node.remove(t)
        hits += 1
    g.reindex()
    return hits


def _dynamic_source(g: _Graph, name: str):
    """x, when `name` is DQ(Q(x, s, zp), s, zp) with (s, zp) from DynamicQuantizeLinear(x)."""
    dq = g.prod.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = g.prod.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    dql = g.prod.get(q.input[1])
    if dql is None or dql.op_type != "DynamicQuantizeLinear" or dql.input[0] != q.input[0]:
        return None
    return q.input[0]


def _dynamic_matmul(g: _Graph) -> int:
    hits = 0
    for mm in list(g.g.node):
        if mm.op_type not in ("MatMul", "Gemm"):
            continue
        src = _dynamic_source(g, mm.input[0])
        found = g.weight_dq(mm.input[1])
        if src is None or found is None:
            continue
        dq, q, s, z, axis = found
        if mm.op_type == "Gemm":
            if g.attr(mm, "transA", 0) or g.attr(mm, "alpha", 1.0) != 1.0 or g.attr(mm, "beta", 1.0) != 1.0:
                continue
            if g.attr(mm, "transB", 0):
                q, axis = q.T, (None if axis is None else 1 - axis)
        if q.ndim != 2 or (axis is not None and axis != 1):
            continue
        n = q.shape[1]
        bias, out = (mm.input[2] if mm.op_type == "Gemm" and len(mm.input) > 2 else ""), mm.output[0]
        users = g.cons[out]
        if not bias and len(users) == 1 and users[0].op_type == "Add" and out not in g.outputs:
            add = users[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = g.const(other)
            if b is not None and b.ndim == 1 and b.shape[0] == n and b.dtype == np.float32:
                bias, out = other, add.output[0]
                g.g.node.remove(add)
        scale = np.broadcast_to(s.reshape(-1), (n,)).astype(np.float32)
        zp = np.broadcast_to(z.reshape(-1), (n,)).astype(q.dtype)
        node = helper.make_node("DynamicQuantizeMatMul",
                                [src, g.add_init(q, "w_int8"), g.add_init(scale, "w_scale"),
                                 g.add_init(zp, "w_zp"), bias], [out], name=f"{mm.name}_dyn",
                                domain=_MS)
        node.doc_string = mm.doc_string
        g.g.node.insert(list(g.g.node).index(mm), node)
        g.g.node.remove(mm)
        hits += 1
    if hits and not any(o.domain == _MS for o in g.model.opset_import):
        g.model.opset_import.append(helper.make_opsetid(_MS, 1))
    g.reindex()
    return hits


def _fit_weight_scale(g: _Graph, n, found, b: np.ndarray, sx: float):
    """The weight scales under which `n`'s int32 bias fits its kernel (convert.bias_scale_floor):
    the IR's own where they do (fxpress's ConvertToQDQ makes them fit), else those channels'
    int8 weights requantized at the floor, in new initializers (an IR from elsewhere: torchao's
    observers floor a dead channel's scale at 1.2e-7, and a -2.0 bias then wraps around the
    int32 sum; the requantized weights move the output by < k * 64 / 2^30 of the bias).
    None where that cannot be done (asymmetric weights, a weight read by other nodes)."""
    from ...passes.quant.convert import bias_scale_floor
    import torch
    dq, q, s, z, axis = found
    per_channel = axis is not None
    if per_channel and (axis != 0 or s.size != b.size):
        return s if s.size in (1, b.size) else None
    k = int(np.prod(q.shape[1:])) if n.op_type == "Conv" else int(q.shape[0 if not g.attr(n, "transB", 0) else 1])
    floor = bias_scale_floor(torch.from_numpy(np.array(b, np.float32)), sx, k).numpy()
    sw = np.broadcast_to(s.reshape(-1), b.shape).astype(np.float32)
    low = floor > sw
    if not low.any():
        return s
    if z.any() or not g.only_user(dq.input[0], dq) or not g.only_user(dq.output[0], n):
        return None
    new_s = np.maximum(sw, floor).astype(np.float32) if per_channel else \
        np.asarray(max(float(sw.max()), float(floor.max())), np.float32)
    ratio = (s.reshape(-1) / new_s.reshape(-1)).reshape((-1,) + (1,) * (q.ndim - 1)) \
        if per_channel else s / new_s
    info = np.iinfo(q.dtype)
    new_q = np.clip(np.round(q.astype(np.float64) * ratio), max(info.min, -127), info.max)
    dq.input[0] = g.add_init(new_q.astype(q.dtype), "w_bias_fit")
    dq.input[1] = g.add_init(new_s, "w_scale_bias_fit")
    g.bias_fit = getattr(g, "bias_fit", 0) + int(low.sum())
    return new_s


def _bias_int32(g: _Graph) -> int:
    hits = 0
    for n in g.g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or not n.input[2]:
            continue
        if n.op_type == "Gemm" and (g.attr(n, "alpha", 1.0) != 1.0 or g.attr(n, "beta", 1.0) != 1.0):
            continue
        xdq, found, b = g.prod.get(n.input[0]), g.weight_dq(n.input[1]), g.const(n.input[2])
        if xdq is None or xdq.op_type != "DequantizeLinear" or found is None or b is None \
                or b.dtype != np.float32 or b.ndim != 1:
            continue
        sx = g.const(xdq.input[1])
        if sx is None or sx.size != 1:
            continue
        sw = _fit_weight_scale(g, n, found, b, float(sx.reshape(())))
        if sw is None:
            continue  # the bias cannot be held in int32: the conv stays float (and exact)
        scale = (float(sx.reshape(())) * np.broadcast_to(sw.reshape(-1), b.shape)).astype(np.float32)
        if not (scale > 0).all():
            continue
        bq = np.clip(np.round(b / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        out = n.input[2] + "_int32_dq"
        g.g.node.insert(list(g.g.node).index(n), helper.make_node(
            "DequantizeLinear", [g.add_init(bq, "bias_int32"), g.add_init(scale, "bias_scale"),
                                 g.add_init(np.zeros_like(bq), "bias_zp")], [out], axis=0))
        n.input[2] = out
        hits += 1
    g.reindex()
    return hits


def _global_avg_pool(g: _Graph) -> int:
    hits = 0
    for n in list(g.g.node):
        if n.op_type != "ReduceMean" or g.attr(n, "keepdims", 1) != 1 or len(n.input) < 2:
            continue
        axes, rank = g.const(n.input[1]), g.ranks.get(n.input[0])
        if axes is None or rank != 4 or sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
            continue
        g.swap(n, helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name))
        hits += 1
    g.reindex()
    return hits


def _pairs_fit(g: _Graph, n, q: np.ndarray) -> bool:
    """Whether full-range s8 weights are still exact on u8 x s8 without VNNI: every adjacent
    K-pair |w0| + |w1| <= 128 (Quantize's s8_pairs form), checked on the ONNX layout (the
    output-channel axis: DQ's `axis` when per-channel, 1 for [K, N] MatMul weights)."""
    import torch
    from ...passes.quant.weight_form import pairs_fit_int16
    if n.op_type == "DynamicQuantizeMatMul":
        axis = 1
    else:
        scale = g.const(n.input[1])
        per_channel = scale is not None and scale.ndim == 1 and scale.size > 1
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1) if per_channel else None
    return pairs_fit_int16(torch.from_numpy(q.astype(np.int16)).to(torch.int8), axis)


def shift_weights(g: _Graph, mode: str) -> int:
    """Shift int8 weight initializers to uint8 where `mode` says: "u8" all, "auto" those that
    could saturate u8 x s8 without VNNI (int16 pair sums, ORT #6004): |q| > 64 and some
    adjacent K-pair over 128; "s8" none."""
    if mode == "s8":
        return 0
    hits = 0
    for n in g.g.node:
        if n.op_type == "DequantizeLinear":
            slots = (0, 2)
        elif n.op_type == "DynamicQuantizeMatMul":
            slots = (1, 3)
        else:
            continue
        q, z = g.const(n.input[slots[0]]), g.const(n.input[slots[1]])
        if q is None or z is None or q.dtype != np.int8 or q.ndim < 2 or n.input[slots[0]] not in g.inits:
            continue
        if mode == "auto" and (int(np.abs(q.astype(np.int16)).max(initial=0)) <= S8_EXACT_MAX
                               or _pairs_fit(g, n, q)):
            continue
        n.input[slots[0]] = g.add_init((q.astype(np.int16) + 128).astype(np.uint8), "w_u8")
        n.input[slots[1]] = g.add_init((z.astype(np.int16) + 128).astype(np.uint8), "zp_u8")
        hits += 1
    return hits


def weight_forms(model: onnx.ModelProto) -> dict[str, int]:
    """{"s8": n, "u8": m}: the int8 weight tensors (rank >= 2) the model reads, by type."""
    g = _Graph(model)
    forms: dict[str, int] = {}
    for n in g.g.node:
        slot = {"DequantizeLinear": 0, "DynamicQuantizeMatMul": 1}.get(n.op_type)
        t = g.inits.get(n.input[slot]) if slot is not None else None
        if t is not None and len(t.dims) >= 2 and t.data_type in (TensorProto.INT8, TensorProto.UINT8):
            k = "s8" if t.data_type == TensorProto.INT8 else "u8"
            forms[k] = forms.get(k, 0) + 1
    return forms


def optimize_qdq(model: onnx.ModelProto, int8_weights: str = "s8") -> tuple[onnx.ModelProto, dict]:
    """Apply the rules above in order; returns the model and {rule: hits} for the rules that fired."""
    g = _Graph(model)
    hits = {"weight_transpose": _weight_transpose(g), "dynamic_matmul": _dynamic_matmul(g),
            "bias_int32": _bias_int32(g), "global_avg_pool": _global_avg_pool(g),
            "pad_into_conv": pad_into_conv(g)}
    hits["bias_fit"] = getattr(g, "bias_fit", 0)  # weight channels requantized for the bias
    g.prune()  # the folded Pads must be gone before the unshuffle looks at its readers
    hits["space_to_depth"] = space_to_depth(g)
    g.prune()
    hits["weights_u8"] = shift_weights(g, int8_weights)
    g.prune()
    return model, {k: v for k, v in hits.items() if v}
