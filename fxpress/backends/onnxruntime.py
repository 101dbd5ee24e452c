"""ONNX Runtime backend: the IR exported through torch.onnx, an ORT session set up for int8.

    run = fxpress.lower(cm, backend="onnxruntime", example_inputs=(x,))
    run.report["kernels"]      # {'QLinearConv': 20, 'QLinearAdd': 8, 'QGemm': 1, ...}
    run(x7)                    # any batch: the IR's dynamic dims are dim_params in the graph
    run.save("model.onnx")     # plain .onnx: onnx.checker accepts it, any onnxruntime runs it

The IR goes through torch.onnx's exporter (torchlib translates every ATen op) with our
translations for the dynamic quantization ops and rewrites into ORT's QDQ form
(fxpress.backends.onnx). `report["kernels"]` is read back from ORT's *optimized* graph, so it
says which int8 kernels really run; `report["onnx_ops"]` counts the exported graph's ops.
The whole IR is one ONNX graph or the lowering fails naming the op and module
(`UnsupportedOpError`): there is no PyTorch fallback, so `report["fallback"]` is always empty.
"""
from __future__ import annotations

import collections
import copy
import os
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx

from ..errors import LoweringError, RecipeError
from ..recipe import check_choice
from ..utils import atomic_write, iter_batches
from .base import Lowered, flatten_inputs
from .onnx import export_onnx, has_vnni
from .onnx.fuse import weight_forms
from .onnx.qdq import QUANT_OPS
from .onnx.requant import requantize_outputs

__all__ = ["compile_onnxruntime", "OrtLowered", "session_options", "physical_cores",
           "INT8_KERNELS"]

# ORT op types that mean an int8 kernel runs (fused from QDQ or emitted directly).
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
                "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
                "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "MatMulInteger",
                "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
                "DynamicQuantizeLSTM", "MatMulNBits")
_LEVELS = ("disable", "basic", "extended", "all")


def physical_cores() -> int:
    from .. import hw
    return max(1, int(hw.host().physical_cores or 1))


def session_options(threads: int | None = None, optimization: str = "all",
                    optimized_path: str | None = None, spinning: bool = True):
    """ORT options we use: all graph optimizations, one intra-op thread per physical core.
    `spinning=False`: idle pool threads sleep instead of spin-waiting (on a loaded or shared
    machine spinning threads steal the cores the running op needs)."""
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
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


class _Session:
    """One ORT session over one ONNX model; torch tensors in, torch tensors out."""

    def __init__(self, model: onnx.ModelProto, threads, optimization, spinning: bool = True):
        import onnxruntime as ort
        self.model = model
        with tempfile.TemporaryDirectory() as tmp:
            opt = os.path.join(tmp, "optimized.onnx")
            so = session_options(threads, optimization, opt, spinning)
            try:
                self.session = ort.InferenceSession(model.SerializeToString(), so,
                                                    providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types
                raise LoweringError(f"ONNX Runtime refused the exported model: {e}") from e
            optimized = onnx.load(opt, load_external_data=False) if os.path.exists(opt) else None
        self.kernels = collections.Counter(n.op_type for n in optimized.graph.node) \
            if optimized is not None else collections.Counter()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs):
        feed = {n: (x.detach().cpu().contiguous().numpy() if isinstance(x, torch.Tensor)
                    else np.asarray(x)) for n, x in zip(self.input_names, inputs)}
        return [torch.from_numpy(o) for o in self.session.run(self.output_names, feed)]


class OrtLowered(Lowered):
    """The IR as one ORT session; called like the model (args and kwargs), returns its outputs."""

    backend = "onnxruntime"

    def __init__(self, gm: fx.GraphModule, exported, session: _Session, report: dict):
        super().__init__(gm)
        self.graph_module = gm  # the IR that was exported (requantized outputs included)
        self.exported, self.session, self.report = exported, session, report

    @property
    def onnx_model(self) -> onnx.ModelProto:
        return self.session.model

    def run_flat(self, flat_inputs: Sequence[Any]):
        ins = [flat_inputs[i] for i in self.exported.input_index]
        with torch.no_grad():
            outs = iter(self.session(*ins))
        return [next(outs) if c is None else c for c in self.exported.outputs]

    def save(self, path):
        """Write the .onnx (portable QDQ form; ORT fuses it again when it loads it). Its
        ``metadata_props`` carry the signature and pytree specs ``fxpress.load`` reads back."""
        from ..saving import check_suffix
        from .artefacts import spec_metadata
        path = check_suffix(path, "onnxruntime")
        model = onnx.ModelProto()
        model.CopyFrom(self.onnx_model)
        keep = [p for p in model.metadata_props if not p.key.startswith("fxpress.")]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
        for k, v in spec_metadata(self).items():
            model.metadata_props.add(key=k, value=v)
        return atomic_write(path, lambda tmp: onnx.save_model(model, tmp))


def _flat(gm: fx.GraphModule, inputs) -> list:
    """Inputs in the IR's placeholder order (fxpress.lower passes them flat already)."""
    inputs = tuple(inputs)
    if len(inputs) == sum(n.op == "placeholder" for n in gm.graph.nodes):
        return list(inputs)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return flatten_inputs(info.in_spec if info is not None else None, inputs, {})


def compile_onnxruntime(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                        calibration: Iterable | None = None, threads: int | None = None,
                        optimization: str = "all", requantize: bool = True,
                        int8_weights: str = "auto", transformer_fusion: str = "auto",
                        spinning: bool = True, space_to_depth: bool = True,
                        **options: Any) -> OrtLowered:
    """Export `gm` to ONNX and open an ORT CPU session on it.

    `example_inputs` (and each `calibration` batch) are the IR's flat inputs (placeholder
    order, as `fxpress.lower` passes them) or the model's positional inputs.
    `calibration`: batches used to give int8 conv/linear outputs that feed fp32 ops their own
    Q/DQ (see onnx/requant.py); the example inputs are used when none are given.
    `int8_weights`: "auto" | "s8" | "u8": without VNNI, "auto" keeps a weight s8 only where
    that is exact, |q| <= 64, e.g. ``Quantize(reduce_range=True)``, and shifts the others to
    u8 (``report["int8_weights"]`` counts the tensors of each form).
    `transformer_fusion`: "auto" | "on" | "off": ORT's transformer optimizer (Attention,
    SkipLayerNorm, BiasGelu fusions) on transformer graphs; "auto" keeps it only when it times
    faster here (``report["transformer_fusion"]`` has both timings and the decision).
    `spinning`: ORT's intra-op spin-waiting (False on shared machines: see session_options).
    `space_to_depth`: run int8 strided stems on <= 3 input channels as SpaceToDepth + a
    stride-1 conv (exact; backends/stem.py); ``report["rewrites"]["space_to_depth_stem"]``.
    ``run.graph_module`` is the IR that was exported (after requantization).
    """
    if options:
        name = next(iter(options))
        raise RecipeError("unknown onnxruntime backend option", field=name, value=options[name],
                          accepted=["calibration", "threads", "optimization", "requantize",
                                    "int8_weights", "transformer_fusion", "spinning",
                                    "space_to_depth"])
    check_choice("device", device, ["cpu"])
    check_choice("optimization", optimization, _LEVELS)
    check_choice("int8_weights", int8_weights, ["auto", "s8", "u8"])
    check_choice("transformer_fusion", transformer_fusion, ["auto", "on", "off"])
    mode = "s8" if int8_weights == "auto" and has_vnni() else int8_weights
    report: dict[str, Any] = {"threads": threads or physical_cores(), "optimization": optimization}
    flat = _flat(gm, example_inputs)
    if requantize and any(n.target in QUANT_OPS for n in gm.graph.nodes):
        batches = [_flat(gm, b) for b in iter_batches(calibration)] if calibration is not None else []
        gm, done = requantize_outputs(gm, batches or [flat])
        report["requantized_outputs"] = done
    else:
        gm = copy.copy(gm)
    exported = export_onnx(gm, flat, int8_weights=mode, space_to_depth=space_to_depth)
    model = exported.model
    report.update(export_s=round(exported.seconds, 2), rewrites=exported.rewrites,
                  dynamic_dims=exported.dynamic, int8_weights=weight_forms(model),
                  onnx_ops=dict(collections.Counter(n.op_type for n in model.graph.node)))
    if transformer_fusion != "off":
        from .onnx.transformer import maybe_fuse
        model, report["transformer_fusion"] = maybe_fuse(
            model, exported, flat, forced=transformer_fusion == "on", threads=threads)
        exported = type(exported)(model, exported.input_index, exported.input_names,
                                  exported.outputs, exported.dynamic, exported.rewrites,
                                  exported.seconds)
    sess = _Session(model, threads, optimization, spinning)
    report.update(kernels=dict(sess.kernels), fallback=[], partitions=1)
    lowered = OrtLowered(gm, exported, sess, report)
    if lowered.signature.is_dynamic and not exported.dynamic:  # exported static (export.py warned)
        lowered.signature = lowered.signature.fixed(flat)
        report["shapes"] = "static: a pass fixed a dynamic dim to the example's size"
    return lowered
