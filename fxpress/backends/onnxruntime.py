"""ONNX Runtime backend: our ONNX emitter + an ORT session set up for int8 kernels.

    run = fxpress.lower(cm, backend="onnxruntime", example_inputs=(x,))
    run.report["kernels"]      # {'QLinearConv': 20, 'QLinearAdd': 8, 'QGemm': 1, ...}
    run.save("model.onnx")     # plain .onnx: onnx.checker accepts it, any onnxruntime runs it

The IR is emitted as ONNX QDQ (fxpress.backends.onnx) that ORT's QDQ selectors fuse into
QLinearConv / QGemm / QLinearAdd / DynamicQuantizeMatMul. `report["kernels"]` is read back
from ORT's *optimized* graph, so it says which int8 kernels really run.

Ops the emitter has no rule for do not crash the lowering: the graph is cut into ORT
partitions around them and those nodes run in PyTorch (warned once, named in
``report["fallback"]``). `save` needs a graph with no such fallback.
"""
from __future__ import annotations

import collections
import copy
import os
import tempfile
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx

from ..errors import LoweringError, RecipeError, UnsupportedOpError
from ..ir.meta import lineage
from ..recipe import check_choice
from ..utils import atomic_write, iter_batches
from .base import Lowered
from .onnx import emit_onnx, supported
from .onnx.qdq import QUANT_OPS
from .onnx.requant import requantize_outputs

__all__ = ["compile_onnxruntime", "OrtLowered", "session_options", "physical_cores",
           "INT8_KERNELS"]

# ORT op types that mean an int8 kernel runs (fused from QDQ or emitted directly).
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
                "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "MatMulInteger",
                "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
                "DynamicQuantizeLSTM")
_LEVELS = ("disable", "basic", "extended", "all")
_warned: set[str] = set()


def physical_cores() -> int:
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


def session_options(threads: int | None = None, optimization: str = "all",
                    optimized_path: str | None = None):
    """ORT options we use: all graph optimizations, one intra-op thread per physical core."""
    import onnxruntime as ort
    check_choice("optimization", optimization, _LEVELS)
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    so.intra_op_num_threads = threads or physical_cores()  # hyper-threads only add contention
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


class _Session:
    """One ORT session over one emitted ONNX model; torch tensors in, torch tensors out."""

    def __init__(self, model: onnx.ModelProto, threads, optimization):
        import onnxruntime as ort
        self.model = model
        with tempfile.TemporaryDirectory() as tmp:
            opt = os.path.join(tmp, "optimized.onnx")
            so = session_options(threads, optimization, opt)
            try:
                self.session = ort.InferenceSession(model.SerializeToString(), so,
                                                    providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types
                raise LoweringError(f"ONNX Runtime refused the emitted model: {e}") from e
            optimized = onnx.load(opt, load_external_data=False) if os.path.exists(opt) else None
        self.kernels = collections.Counter(n.op_type for n in optimized.graph.node) \
            if optimized is not None else collections.Counter()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: torch.Tensor):
        feed = {n: (x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor)
                    else np.asarray(x)) for n, x in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names, feed)
        return [torch.from_numpy(o) for o in outs]


class _OrtModule(torch.nn.Module):
    """A partition of the graph run by ORT, called from the PyTorch parent graph."""

    def __init__(self, sess: _Session):
        super().__init__()
        self.sess = sess

    def forward(self, *inputs):
        outs = self.sess(*inputs)
        return outs[0] if len(outs) == 1 else tuple(outs)


class OrtLowered(Lowered):
    backend = "onnxruntime"

    def __init__(self, gm: fx.GraphModule, sessions: list[_Session], runner, report: dict):
        super().__init__(gm)
        self.graph_module = gm  # the IR that was emitted (requantized outputs included)
        self.sessions, self._runner, self.report = sessions, runner, report

    @property
    def onnx_model(self) -> onnx.ModelProto:
        if len(self.sessions) != 1 or self.report.get("fallback"):
            raise LoweringError("the graph runs in several ONNX partitions with PyTorch fallback "
                                f"nodes ({', '.join(self.report.get('fallback', []))}); "
                                "there is no single .onnx for it")
        return self.sessions[0].model

    def run_flat(self, flat_inputs: Sequence[torch.Tensor]):
        with torch.no_grad():
            return list(self._runner(*flat_inputs))

    def save(self, path):
        """Write the .onnx (portable QDQ form; ORT fuses it again when it loads it)."""
        model = self.onnx_model
        return atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


def _node_label(n: fx.Node) -> str:
    lin = lineage(n)
    where = lin.module_path if lin is not None and lin.module_path else n.name
    return f"{n.target} at {where}"


def _warn_once(op: str, where: str) -> None:
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"fxpress onnxruntime: no ONNX rule for {op} (first at {where}); "
                      "that region runs in PyTorch", stacklevel=3)


def compile_onnxruntime(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                        calibration: Iterable | None = None, threads: int | None = None,
                        optimization: str = "all", requantize: bool = True,
                        int8_weights: str = "auto", **options: Any) -> OrtLowered:
    """Emit `gm` as ONNX and open an ORT CPU session on it.

    `calibration`: batches used to give int8 conv/linear outputs that feed fp32 ops their own
    Q/DQ (see onnx/requant.py); the example inputs are used when none are given.
    `int8_weights`: "auto" | "s8" | "u8" (see onnx.emitter.emit_onnx: without VNNI, "auto"
    keeps a weight s8 only where that is exact, |q| <= 64, e.g. ``Quantize(reduce_range=True)``;
    ``report["int8_weights"]`` counts the tensors of each form). ``run.graph_module`` is the IR that was emitted (after requantization).
    """
    if options:
        name = next(iter(options))
        raise RecipeError("unknown onnxruntime backend option", field=name, value=options[name],
                          accepted=["calibration", "threads", "optimization", "requantize",
                                    "int8_weights"])
    check_choice("device", device, ["cpu"])
    check_choice("optimization", optimization, _LEVELS)
    check_choice("int8_weights", int8_weights, ["auto", "s8", "u8"])
    from .onnx.emitter import has_vnni
    mode = "s8" if int8_weights == "auto" and has_vnni() else int8_weights
    report: dict[str, Any] = {"threads": threads or physical_cores(), "optimization": optimization,
                              "int8_weights": _weight_forms(gm, mode)}
    emit = {"int8_weights": mode}
    if requantize and any(n.target in QUANT_OPS for n in gm.graph.nodes):
        batches = list(iter_batches(calibration)) or [tuple(example_inputs)]
        gm, done = requantize_outputs(gm, batches)
        report["requantized_outputs"] = done
    else:
        gm = copy.copy(gm)

    bad: dict[str, str] = {n.name: _node_label(n) for n in gm.graph.nodes if not supported(n)}
    for _ in range(32):  # an op may also refuse its arguments: mark it and partition again
        try:
            if not bad:
                model = emit_onnx(gm, example_inputs, **emit)
                sess = _Session(model, threads, optimization)
                report["kernels"] = dict(sess.kernels)
                report["fallback"] = []
                return OrtLowered(gm, [sess], sess, report)
            return _partitioned(gm, example_inputs, bad, threads, optimization, report, emit)
        except UnsupportedOpError as e:
            if e.node_name is None or e.node_name in bad:
                raise
            node = next(n for n in gm.graph.nodes if n.name == e.node_name)
            bad[e.node_name] = f"{_node_label(node)}: {e}"
    raise LoweringError("too many unsupported ops for the ONNX emitter")


def _weight_forms(gm: fx.GraphModule, mode: str) -> dict[str, int]:
    """{"s8": n, "u8": m}: how many int8 weight tensors the emitter keeps signed / shifts."""
    from .onnx.emitter import _fetch_attr
    from .onnx.qdq import DQ_CHANNEL, DQ_TENSOR, s8_exact
    forms: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.target in (DQ_CHANNEL, DQ_TENSOR) and isinstance(n.args[0], fx.Node) \
                and n.args[0].op == "get_attr":
            q = _fetch_attr(gm, n.args[0].target)
            if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
                continue
            u8 = mode == "u8" or (mode == "auto" and not s8_exact(q))
            forms["u8" if u8 else "s8"] = forms.get("u8" if u8 else "s8", 0) + 1
    return forms


def _partitioned(gm: fx.GraphModule, example_inputs, bad: dict[str, str], threads,
                 optimization, report, emit) -> OrtLowered:
    from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
    from torch.fx.passes.operator_support import OperatorSupportBase
    from ..passes.analysis.shape_prop import propagate_shapes

    for name, label in bad.items():
        _warn_once(label.split(" at ")[0], label.split(" at ")[-1])
    gm = copy.deepcopy(gm)
    propagate_shapes(gm, example_inputs)

    class _Support(OperatorSupportBase):
        def is_node_supported(self, submodules, node):
            return node.op == "call_function" and node.name not in bad and supported(node)

    parts = CapabilityBasedPartitioner(gm, _Support(), allows_single_node_partition=True
                                       ).partition_and_fuse()
    sessions = []
    for node in list(parts.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith("fused_"):
            continue
        sub = parts.get_submodule(node.target)
        _inline_constants(parts, node, sub)
        inputs = [a.meta["val"] for a in node.args]
        sub.graph.lint()
        sub.recompile()
        sess = _Session(emit_onnx(sub, [torch.zeros(v.shape, dtype=v.dtype) for v in inputs], **emit),
                        threads, optimization)
        sessions.append(sess)
        setattr(parts, node.target, _OrtModule(sess))
    parts.graph.eliminate_dead_code()
    parts.recompile()
    kernels = collections.Counter()
    for s in sessions:
        kernels.update(s.kernels)
    report.update(kernels=dict(kernels), fallback=sorted(set(bad.values())),
                  partitions=len(sessions))
    runner = _flat_runner(parts)
    return OrtLowered(gm, sessions, runner, report)


def _inline_constants(parent: fx.GraphModule, call: fx.Node, sub: fx.GraphModule) -> None:
    """Turn partition inputs that are parent get_attrs back into the partition's own get_attrs.

    The partitioner passes weights in as inputs; an int8 weight must be an initializer of the
    ONNX graph for ORT to fuse it, so we move the tensor into the submodule.
    """
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    keep = []
    for i, (arg, ph) in enumerate(zip(call.args, phs)):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            obj = parent
            for part in str(arg.target).split("."):
                obj = getattr(obj, part)
            attr = f"_const_{i}"
            sub.register_buffer(attr, obj.detach() if isinstance(obj, torch.Tensor) else obj)
            with sub.graph.inserting_before(ph):
                ga = sub.graph.get_attr(attr)
            ga.meta = dict(ph.meta)
            ph.replace_all_uses_with(ga)
            sub.graph.erase_node(ph)
        else:
            keep.append(arg)
    call.args = tuple(keep)


def _flat_runner(parent: fx.GraphModule):
    """Call the parent graph with flat tensors and get a flat list back (no pytree codegen)."""
    parent.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in parent.graph.nodes if n.op == "output")
    out.args = (list(torch.utils._pytree.tree_leaves(out.args[0])),)
    parent.recompile()
    return parent
