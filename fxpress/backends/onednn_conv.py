"""Int8 convs on ATen's prepacked oneDNN convolution, as extern kernels in the Inductor graph.

Inductor lowers ``dq -> conv -> (add) -> (relu) -> q`` to ``onednn.qconv_pointwise``, which
builds its oneDNN primitive descriptor and scratchpad on every call. The eager quantized engine
(``quantized::conv2d*`` on ``PackedConvWeightsOnednn``) runs the same brgconv kernels but
keeps the primitive from the first call. Measured on a 2-core AMX host, ResNet-18 int8 batch
1, one interleaved run: Inductor's own qconvs 5.15 ms, the same IR through the eager engine
3.86 ms (ORT fp32 17.0 ms). Calling the eager kernels from Python costs ~50 us per conv
(dispatch + the ``int_repr`` copy: ~70 us per 200 kB), so csrc/onednn_conv.cpp wraps them as
C++ ops on plain uint8 tensors (``fxpress::qconv2d``, ``fxpress::qconv2d_add``): inputs are
viewed as quint8 and outputs as uint8 without copies, and Inductor calls them as extern
kernels beside its own fused kernels for everything else.

The rewrite runs on the flat copy a backend compiles (never the user's IR), before the stem
rewrite: a 3-channel stem runs packed as it is (2.72 ms for ResNet-18 against 2.90 ms with the
unshuffle, one run), the unshuffle serves Inductor's own qconvs. Each matched conv is prepacked once at lowering time and called by handle (a packed
conv is a TorchScript custom class, which an Inductor graph cannot hold as a constant). It
applies where:

- the conv reads ``dequantize_per_tensor(u8)`` and a symmetric int8 weight (per-channel or
  per-tensor, zero point 0), its bias is a constant or absent;
- its output goes, through at most one ``add(dq(u8))`` and one ``relu``, each used once,
  straight to ``quantize_per_tensor(u8)`` (a float result stays on Inductor's path);
- the host has VNNI or AMX (``fxpress.hw``): without them oneDNN's u8 x s8 pair sums saturate
  on full-range weights, which the weight forms of fxpress.Quantize only avoid for the
  kernels they were chosen for;
- the extension builds (torch.utils.cpp_extension, ~10 s once, cached in
  ``TORCH_EXTENSIONS_DIR``); if it does not, the convs stay on Inductor's path and the report
  says why.

Numerics: the same int32 sums as Inductor's kernels and the IR; the requantization rounds in
fp32 like Inductor's, so outputs agree with the IR within one quantization step.

    >>> n = packed_onednn_convs(flat_gm)    # in place; how many convs it rewrote
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.fx as fx

from ..ir.meta import lineage, module_path, set_record
from ..passes.cleanup.dce import remove_unused_attributes
from ..passes.quant.convert import fetch_attr
from .stem import _conv_args

__all__ = ["available", "host_reason", "packed_counts", "packed_onednn_convs", "release_when_collected",
           "layer_kernels"]

_Q = torch.ops.quantized_decomposed
_CONVS = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
_RELUS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
_ADDS = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_SRC = os.path.join(os.path.dirname(__file__), "csrc", "onednn_conv.cpp")
# output geometry per handle, for the fake (meta) kernels: (out_channels, kernel, stride, pad, dilation)
_GEOMETRY: dict[int, tuple] = {}


def host_reason() -> str | None:
    """Why this host cannot run the packed convs (None: it can; the extension is not built)."""
    from .. import hw
    h = hw.host()
    if not h.x86:
        return f"not an x86 host ({h.arch})"
    if not (h.vnni or h.amx_int8):
        return "no VNNI/AMX on this host (oneDNN's u8 x s8 pair sums could saturate)"
    if "onednn" not in torch.backends.quantized.supported_engines:
        return "this torch build has no oneDNN quantized engine"
    return None


@functools.lru_cache(maxsize=1)
def _build() -> str | None:
    """Build/load the extension once per process; None when it loaded, else why not."""
    try:
        from torch.utils.cpp_extension import load
        load("fxpress_onednn_conv", sources=[_SRC], extra_cflags=["-O2"],
             is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001  (no compiler, headers missing: keep Inductor's path)
        return f"the extension did not build: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for name, fake in (("fxpress::qconv2d", _qconv2d_fake), ("fxpress::qconv2d_add", _qconv2d_add_fake)):
        torch.library.register_fake(name)(fake)
    return None


def available() -> tuple[bool, str]:
    """(usable on this host, why not): the host check, then the (cached) extension build."""
    why = host_reason() or _build()
    return why is None, why or ""


def _out(x: torch.Tensor, handle: int) -> torch.Tensor:
    o, (kh, kw), stride, pad, dil = _GEOMETRY[handle]
    n, _, h, w = x.shape
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, o, oh, ow), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)


def _qconv2d_fake(x, handle, x_scale, x_zero_point, y_scale, y_zero_point, relu):
    return _out(x, handle)


def _qconv2d_add_fake(x, accum, handle, x_scale, x_zero_point, a_scale, a_zero_point,
                      y_scale, y_zero_point, relu):
    return _out(x, handle)


def _single_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _u8_dq(n) -> bool:
    return (isinstance(n, fx.Node) and n.target == _Q.dequantize_per_tensor.default
            and len(n.args) >= 6 and n.args[5] == torch.uint8
            and all(not isinstance(a, fx.Node) for a in n.args[1:3]))


def _packed_weight(gm: fx.GraphModule, wdq: fx.Node):
    """The int8 weight as a quantized (qint8) tensor, or None when it is not symmetric int8."""
    if not isinstance(wdq, fx.Node) or not all(isinstance(a, fx.Node) and a.op == "get_attr"
                                               for a in wdq.args[:1]):
        return None
    w = fetch_attr(gm, wdq.args[0].target)
    if w.dtype != torch.int8 or w.dim() != 4:
        return None
    if wdq.target == _Q.dequantize_per_channel.default:
        if wdq.args[3] != 0 or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in wdq.args[1:3]):
            return None
        s, z = fetch_attr(gm, wdq.args[1].target), fetch_attr(gm, wdq.args[2].target)
        if bool((z != 0).any()):
            return None
        return torch._make_per_channel_quantized_tensor(w, s.double(), z.long(), 0)
    if wdq.target == _Q.dequantize_per_tensor.default:
        s, z = wdq.args[1:3]
        if isinstance(s, fx.Node) or z != 0:
            return None
        return torch._make_per_tensor_quantized_tensor(w, float(s), 0)
    return None


# u8 producers Inductor computes as its own kernels: a packed conv reading one gets it written
# channels-last by that kernel (an int8 pad of TF-"same" padding too: Inductor fuses the pad and
# the layout into one kernel where the op would copy to channels-last on every call)
_INDUCTOR_U8 = {_Q.quantize_per_tensor.default, torch.ops.aten.constant_pad_nd.default}


def _channels_last(g: fx.Graph, xq: fx.Node, made: dict) -> fx.Node:
    """A packed conv's u8 input as Inductor should write it: a quantize of a float tensor
    (Inductor's kernel, NCHW) gets a channels-last clone that Inductor fuses into that kernel
    (ResNet-18's 3 x 224 x 224 input: 151 us, vs 193 us for the kernel then the op's own
    copy). Packed convs' outputs and pools of them are channels-last already."""
    if not (isinstance(xq, fx.Node) and xq.target in _INDUCTOR_U8):
        return xq
    if xq not in made:
        with g.inserting_after(xq):
            made[xq] = g.call_function(torch.ops.aten.clone.default, (xq,),
                                       {"memory_format": torch.channels_last})
    return made[xq]


_CLAMPS = {torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default,
           torch.ops.aten.clamp.default, torch.ops.aten.clamp_.default}


def _clamp_from_zero(n: fx.Node) -> float | None:
    """The upper bound `hi` of ``hardtanh(x, 0, hi)`` / ``clamp(x, 0, hi)`` (ReLU6: 6.0), else
    None."""
    if n.target not in _CLAMPS or n.kwargs:
        return None
    lo, hi = (list(n.args[1:3]) + [None, None])[:2]
    if n.target in (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default):
        lo = -1.0 if lo is None else lo
        hi = 1.0 if hi is None else hi
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node) or lo is None or hi is None:
        return None
    return float(hi) if float(lo) == 0.0 and float(hi) > 0 else None


def _saturates_at(hi: float, scale: float, zero_point: int, qmax: int) -> bool:
    """Whether ``quantize(hi)`` is already the top code: then ``q(clamp(y, 0, hi)) ==
    q(relu(y))`` for every y (q is monotone and saturates), and a ReLU6 before a requantize is a
    plain relu post-op. The observer of a ReLU6 output sees values <= 6, so its scale puts 6 at
    or past 255; where it does not (a scale set elsewhere) the conv stays on Inductor's path."""
    return round(hi / scale) + zero_point >= qmax


def _match(gm: fx.GraphModule, conv: fx.Node):
    """(weight q-tensor, bias, conv args, add's other dq or None, relu, the q node, the nodes
    the rewrite replaces) of one fusable int8 conv, or None."""
    a = _conv_args(conv)
    if a is None:
        return None
    xdq, wdq, b, stride, padding, dilation, groups = a
    if not _u8_dq(xdq):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    wq = _packed_weight(gm, wdq)
    if wq is None:
        return None
    chain, acc, relu = [conv], None, False
    n = _single_user(conv)
    if n is not None and n.target in _ADDS and len(n.args) == 2 and not n.kwargs:
        other = n.args[1] if n.args[0] is conv else n.args[0]
        if not _u8_dq(other) or other is conv:
            return None
        acc = other
        chain.append(n)
        n = _single_user(n)
    clip = None  # an upper bound a ReLU6-style clamp puts on the conv's output
    if n is not None and n.target in _RELUS:
        relu = True
        chain.append(n)
        n = _single_user(n)
    elif n is not None and (clip := _clamp_from_zero(n)) is not None:
        relu = True
        chain.append(n)
        n = _single_user(n)
    if (n is None or n.target != _Q.quantize_per_tensor.default or len(n.args) < 6
            or n.args[5] != torch.uint8 or any(isinstance(v, fx.Node) for v in n.args[1:5])
            or (n.args[3], n.args[4]) != (0, 255)):  # the kernel saturates to the full u8 range
        return None
    if clip is not None and not _saturates_at(clip, float(n.args[1]), int(n.args[2]), 255):
        return None
    bias = fetch_attr(gm, b.target).float() if b is not None else None
    return wq, bias, (stride, padding, dilation, groups), acc, relu, n, chain


def packed_onednn_convs(gm: fx.GraphModule) -> list[int]:
    """Rewrite each matched int8 conv of `gm` (a flat backend copy) in place into
    ``fxpress::qconv2d[_add]``; returns the handles of the convs it packed (release them with
    ``release_when_collected``). Nothing is rewritten where ``available()`` is False."""
    if not available()[0]:
        return []
    g, handles, layouts = gm.graph, [], {}
    for conv in [n for n in g.nodes if n.op == "call_function" and n.target in _CONVS]:
        m = _match(gm, conv)
        if m is None:
            continue
        wq, bias, (stride, padding, dilation, groups), acc, relu, q, chain = m
        prev = torch.backends.quantized.engine
        torch.backends.quantized.engine = "onednn"
        try:
            packed = torch.ops.quantized.conv2d_prepack(wq, bias, stride, padding, dilation, groups)
        finally:
            torch.backends.quantized.engine = prev
        h = torch.ops.fxpress.register_conv(packed)
        _GEOMETRY[h] = (wq.shape[0], tuple(wq.shape[2:]), list(stride), list(padding), list(dilation))
        handles.append(h)
        xdq = conv.args[0]
        xs, xz = float(xdq.args[1]), int(xdq.args[2])
        xq = _channels_last(g, xdq.args[0], layouts)
        ys, yz = float(q.args[1]), int(q.args[2])
        with g.inserting_before(q):
            if acc is None:
                new = g.call_function(torch.ops.fxpress.qconv2d.default,
                                      (xq, h, xs, xz, ys, yz, relu))
            else:
                new = g.call_function(torch.ops.fxpress.qconv2d_add.default,
                                      (xq, acc.args[0], h, xs, xz, float(acc.args[1]),
                                       int(acc.args[2]), ys, yz, relu))
        new.meta.update({k: v for k, v in q.meta.items() if k in ("stack_trace", "nn_module_stack")})
        if lineage(conv) is not None:  # the per-layer kernel table names the user's module
            set_record(new, lineage(conv).derived("packed_onednn_conv"))
        q.replace_all_uses_with(new)
        g.erase_node(q)
        for n in reversed(chain):
            g.erase_node(n)
    if handles:
        g.eliminate_dead_code()
        remove_unused_attributes(gm)  # the int8 weights the packed convs now hold (our copy)
        gm.recompile()
    return handles


_DQ_ACT = {"quantized_decomposed.dequantize_per_tensor.default",
           "quantized_decomposed.dequantize_per_tensor.tensor"}


def layer_kernels(gm: fx.GraphModule) -> list[dict]:
    """Per conv/linear of a flat backend copy after the rewrites: which kernel runs it.

    "packed oneDNN conv" / "packed oneDNN conv + add" (fxpress::qconv2d[_add]), "Inductor qconv"
    / "Inductor qlinear" (an int8 activation left to Inductor's onednn.q*_pointwise lowering)
    or "fp32"; rows name the user's module (lineage)."""
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = str(n.target)
        if t in ("fxpress.qconv2d.default", "fxpress.qconv2d_add.default"):
            kind = "packed oneDNN conv" + (" + add" if t.endswith("add.default") else "")
            rows.append({"layer": module_path(n), "op": "conv2d", "kernel": kind})
        elif n.target in _CONVS or n.target is torch.ops.aten.linear.default:
            x = n.args[0]
            int8 = isinstance(x, fx.Node) and str(x.target) in _DQ_ACT
            op = "linear" if n.target is torch.ops.aten.linear.default else "conv2d"
            kind = ("Inductor q" + ("linear" if op == "linear" else "conv")) if int8 else "fp32"
            rows.append({"layer": module_path(n), "op": op, "kernel": kind})
    return rows


def packed_counts(gm: fx.GraphModule) -> tuple[int, int]:
    """(qconv2d, qconv2d_add) calls in `gm` (by name: the ops need not be loaded)."""
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return ops.count("fxpress.qconv2d.default"), ops.count("fxpress.qconv2d_add.default")


def _release(handles: list[int]) -> None:
    for h in handles:
        torch.ops.fxpress.release_conv(h)
        _GEOMETRY.pop(h, None)


def release_when_collected(owner, handles: list[int]) -> None:
    """Free the packed weights of `handles` when `owner` (the lowered model) is collected."""
    if handles:
        weakref.finalize(owner, _release, list(handles))
