"""Lowerability report: per backend, which quantized regions become int8 kernels, which don't.

    rows = lowerability(gm, "onnxruntime")
    print(format_lowerability(rows))
    # module            op      kernel                  note
    # layer1.0.conv1    conv2d  QLinearConv             relu folded into Q
    # layer1.0.conv2    conv2d  QLinearConv             output requantized for the residual add
    # layer1.0          add     QLinearAdd

Rules mirror what the backends match (ORT's QDQ selectors; Inductor's quantization.py
patterns). They read only the Q/DQ structure, not scale values, so a graph quantized with
placeholder qparams (before calibration) gets the same report as the calibrated one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.meta import lineage
from ..recipe import check_choice
from . import onednn_conv
from .onnx.qdq import CHOOSE, DQ_CHANNEL, DQ_DYN, DQ_TENSOR, Q_DYN, Q_TENSOR, QUANT_OPS

aten = torch.ops.aten
__all__ = ["LowerRow", "lowerability", "format_lowerability", "format_kernels", "inspect_text"]

_CONV = {aten.conv2d.default, aten.conv1d.default, aten.convolution.default}
_LINEAR = {aten.linear.default}
_MATMUL = {aten.matmul.default, aten.bmm.default, aten.mm.default}
_ADD = {aten.add.Tensor, aten.add_.Tensor}
_POOL = {aten.max_pool2d.default, aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default}
_RELU = {aten.relu.default, aten.relu_.default}
_DATA = {aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default,
         aten.transpose.int, aten.dropout.default, aten.contiguous.default, aten.clone.default}


@dataclass(frozen=True)
class LowerRow:
    module: str
    op: str
    kernel: str      # the kernel it becomes, or "fp32" / "PyTorch fallback"
    int8: bool
    note: str = ""


def _is_dq(n) -> bool:
    return isinstance(n, fx.Node) and n.target in (DQ_TENSOR, DQ_DYN)


def _const_w(n) -> bool:
    return isinstance(n, fx.Node) and n.target in (DQ_CHANNEL, DQ_TENSOR) and \
        isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"


def _out_quantized(n: fx.Node) -> tuple[bool, bool]:
    """(output reaches only Q nodes, a relu sits between)."""
    cur, relu = n, False
    while len(cur.users) == 1 and next(iter(cur.users)).target in _RELU:
        cur, relu = next(iter(cur.users)), True
    return bool(cur.users) and all(u.target is Q_TENSOR for u in cur.users), relu


def _feeds_add(n: fx.Node) -> bool:
    cur = n
    while len(cur.users) == 1 and next(iter(cur.users)).target in _RELU:
        cur = next(iter(cur.users))
    return any(u.target in _ADD for u in cur.users)


def _name(n: fx.Node) -> str:
    lin = lineage(n)
    return lin.module_path if lin is not None and lin.module_path else n.name


def _op(n: fx.Node) -> str:
    return str(n.target).split(".")[1] if str(n.target).startswith("aten.") else str(n.target)


def _ort_row(n: fx.Node) -> LowerRow | None:
    a = n.args
    if n.target in _CONV | _LINEAR:
        if a and _is_dq(a[0]) and a[0].target is DQ_DYN and _const_w(a[1]) and n.target in _LINEAR:
            return LowerRow(_name(n), _op(n), "DynamicQuantizeMatMul", True)
        if not (a and _is_dq(a[0]) and _const_w(a[1])):
            if _const_w(a[1]) if len(a) > 1 else False:
                return LowerRow(_name(n), _op(n), "fp32", False, "int8 weight, fp32 activation: DQ stays")
            return None
        quant_out, relu = _out_quantized(n)
        kern = "QLinearConv" if n.target in _CONV else "QGemm"
        rank = n.args[0].meta.get("val").dim() if "val" in n.args[0].meta else 2
        if n.target in _LINEAR and rank > 2:
            # measured on HF BERT: ORT fuses DQ -> MatMul into MatMulIntegerToFloat (u8 x s8,
            # float out); the bias Add after it keeps the output Q separate
            return LowerRow(_name(n), _op(n), "MatMulIntegerToFloat + Add", True,
                            "3-D static linear: float output, bias Add after the int8 MatMul")
        if quant_out:
            return LowerRow(_name(n), _op(n), kern, True, "relu folded into Q" if relu else "")
        if _feeds_add(n):
            return LowerRow(_name(n), _op(n), kern, True, "output requantized for the residual add")
        if n.target in _LINEAR:
            return LowerRow(_name(n), _op(n), "QGemm", True, "fp32 output")
        return LowerRow(_name(n), _op(n), "fp32", False, "output not quantized: Conv on DQ inputs")
    if n.target in _ADD and all(_is_dq(x) or (isinstance(x, fx.Node) and x.target in _CONV | _LINEAR)
                                for x in a[:2]):
        quant_out, _ = _out_quantized(n)
        return LowerRow(_name(n), "add", "QLinearAdd" if quant_out else "fp32 Add", quant_out,
                        "" if quant_out else "output not quantized: Q/DQ pair remains")
    if n.target in _POOL and a and _is_dq(a[0]):
        quant_out, _ = _out_quantized(n)
        k = {"max_pool2d": "MaxPool (u8)", "adaptive_avg_pool2d": "QLinearGlobalAveragePool",
             "avg_pool2d": "QLinearAveragePool"}[_op(n)]
        return LowerRow(_name(n), _op(n), k if quant_out else "fp32", quant_out)
    if n.target in _MATMUL and all(_is_dq(x) for x in a[:2]):
        quant_out, _ = _out_quantized(n)
        return LowerRow(_name(n), _op(n), "QLinearMatMul" if quant_out else "fp32 MatMul", quant_out)
    return None


def _inductor_row(n: fx.Node) -> LowerRow | None:
    a = n.args
    if n.target in _CONV | _LINEAR and len(a) > 1 and _const_w(a[1]):
        if not _is_dq(a[0]):
            return LowerRow(_name(n), _op(n), "fp32", False, "fp32 activation: weight-only DQ")
        fam = "qconv" if n.target in _CONV else "qlinear"
        quant_out, relu = _out_quantized(n)
        # int8 convs requantized (through add / relu) run as packed oneDNN convs on VNNI/AMX
        # hosts (onednn_conv.py; its pattern check decides at lowering time)
        packed = fam == "qconv" and onednn_conv.host_reason() is None
        if _feeds_add(n) and not quant_out:
            kernel = "fxpress.qconv2d_add (packed oneDNN)" if packed else f"onednn.{fam}_pointwise.binary"
            return LowerRow(_name(n), _op(n), kernel, True, "add (+relu) fused as post-op")
        note = ("relu post-op, " if relu else "") + ("int8 output" if quant_out else "fp32 output")
        kernel = "fxpress.qconv2d (packed oneDNN)" if packed and quant_out else f"onednn.{fam}_pointwise"
        return LowerRow(_name(n), _op(n), kernel, True, note)
    if n.target in _POOL and a and _is_dq(a[0]):
        quant_out, _ = _out_quantized(n)
        if n.target is aten.max_pool2d.default and quant_out:
            return LowerRow(_name(n), _op(n), "quantized.max_pool2d", True)
        return LowerRow(_name(n), _op(n), "fp32 (Inductor kernel)", False, "Q/DQ fused into codegen")
    if n.target in _ADD and any(_is_dq(x) for x in a[:2]) and not any(
            isinstance(x, fx.Node) and x.target in _CONV | _LINEAR for x in a[:2]):
        return LowerRow(_name(n), "add", "fp32 (Inductor kernel)", False, "Q/DQ pair remains")
    if n.target in _MATMUL and any(_is_dq(x) for x in a[:2]):
        return LowerRow(_name(n), _op(n), "fp32 (Inductor)", False, "no int8 bmm pattern")
    return None


def _as_inductor_compiles(gm: fx.GraphModule) -> fx.GraphModule:
    """A graph-only copy (weights shared) in the form compile_inductor compiles: the residual
    convs' Q/DQ that ``conv_add="auto"`` put in the IR dropped, so conv + add reads as one kernel."""
    from ..passes.quant.fold import fuse_residual_quant
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = fx.GraphModule(gm, graph)
    fuse_residual_quant(copy)
    return copy


def lowerability(gm: fx.GraphModule, backend: str = "onnxruntime") -> list[LowerRow]:
    """One row per quantized (or unlowerable) region of `gm`, in the user's module names."""
    check_choice("backend", backend, ["onnxruntime", "inductor"])
    rule = _ort_row if backend == "onnxruntime" else _inductor_row
    if backend == "inductor":
        gm = _as_inductor_compiles(gm)
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in QUANT_OPS or n.target in (CHOOSE, Q_DYN):
            continue
        row = rule(n)
        if row is not None:
            rows.append(row)
    return rows


def format_lowerability(rows: list[LowerRow], backend: str = "") -> str:
    n8 = sum(r.int8 for r in rows)
    head = f"lowerability{' to ' + backend if backend else ''}: {n8}/{len(rows)} regions int8"
    w = max([len(r.module) for r in rows] + [6])
    lines = [head, f"{'module':<{w}}  {'op':<20} {'kernel':<32} note"]
    lines += [f"{r.module:<{w}}  {r.op:<20} {r.kernel:<32} {r.note}" for r in rows]
    return "\n".join(lines)


def format_kernels(report: dict) -> str:
    """The ORT kernels a real lowering runs (op types of ORT's optimized graph), int8 first."""
    from .onnxruntime import INT8_KERNELS
    k = report.get("kernels", {})
    int8 = {op: n for op, n in k.items() if op in INT8_KERNELS}
    rest = {op: n for op, n in k.items() if op not in INT8_KERNELS}
    lines = [f"onnxruntime lowering (ORT's optimized graph): {sum(int8.values())} int8 kernels, "
             f"{sum(rest.values())} other nodes; export {report.get('export_s', '?')} s; "
             f"dynamic dims {report.get('dynamic_dims') or 'none'}"]
    lines += [f"  {op:<32} {n:>4}  int8" for op, n in sorted(int8.items(), key=lambda t: -t[1])]
    lines += [f"  {op:<32} {n:>4}" for op, n in sorted(rest.items(), key=lambda t: -t[1])]
    if report.get("transformer_fusion"):
        lines.append(f"  transformer fusion: {report['transformer_fusion']}")
    return "\n".join(lines)


def inspect_text(gm: fx.GraphModule, backend: str = "onnxruntime", *,
                 reference: fx.GraphModule | None = None, inputs=None, lowered=None,
                 worst: int | None = 10, example_inputs=None) -> str:
    """What `fxpress inspect --backend B [--compare]` prints: the lowerability table, and with
    a fp32 `reference` and `inputs`, the per-node SQNR table (worst `worst` nodes first).

    For onnxruntime with `example_inputs` (or `inputs`) the graph is really lowered and the
    kernel counts of ORT's optimized graph lead: what runs, not what the rules predict."""
    text = format_lowerability(lowerability(gm, backend), backend)
    feed = example_inputs if example_inputs is not None else inputs
    if backend == "onnxruntime" and (lowered is not None or feed is not None):
        if lowered is None:
            from .onnxruntime import compile_onnxruntime
            lowered = compile_onnxruntime(gm, tuple(feed), transformer_fusion="off")
        text = format_kernels(lowered.report) + "\n\n" + text
    if reference is not None and inputs is not None:
        from .compare import compare, format_compare
        text += "\n\n" + format_compare(compare(reference, gm, inputs, lowered=lowered), worst)
    return text
