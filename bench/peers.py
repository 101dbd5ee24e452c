"""The peers fxpress is measured against, and the stand-in quantizer for fxpress's own path.

Peers (each returns a callable taking the workload's inputs):
  ort_fp32          torch.onnx.export (dynamo) -> ORT, all optimizations
  inductor_fp32     torch.compile, freezing (scoped)
  ort_static        ORT quantize_static: QDQ, per-channel s8 weights, u8 activations
  ort_dynamic       ORT quantize_dynamic (int8 weights, per-channel)
  torchao_inductor  torchao PT2E X86InductorQuantizer -> Inductor (freezing)
  tp_ort_static     Torch-Pruning 50% (global L2, round_to 8) -> ORT quantize_static
  openvino_fp32     the same fp32 ONNX -> OpenVINO (LATENCY hint, the bench's thread count)
  openvino_nncf     that model -> nncf.quantize (defaults) on the calibration batches -> OpenVINO
ORT quantize_static uses reduce_range on hosts without VNNI (fxpress.hw), as ORT advises.

`pt2e_quantize` produces the contract's quantized IR form through torchao (the peer);
`fxpress_quantize` produces ours with fxpress.Quantize.
"""
from __future__ import annotations

import copy
import os
from typing import Callable, Sequence

import torch

__all__ = ["pt2e_quantize", "fxpress_quantize", "ort_session", "ort_callable", "export_onnx",
           "ort_quantize_static", "torch_pruning", "PEERS", "Peer", "THREADS", "SPINNING"]


def pt2e_quantize(model: torch.nn.Module, example: tuple, calibration: Sequence[tuple], *,
                  dynamic: bool = False) -> torch.fx.GraphModule:
    """torchao PT2E (X86InductorQuantizer) -> fxpress IR (lineage records, guards removed)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from fxpress.frontends.common import finish_ir

    gm = torch.export.export(copy.deepcopy(model).eval(), tuple(example), strict=False).module()
    _split_shared_relus(gm)
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    prepared = prepare_pt2e(gm, q)
    with torch.no_grad():
        for b in calibration:
            prepared(*b)
    return finish_ir(convert_pt2e(prepared))


def _split_shared_relus(gm: torch.fx.GraphModule) -> None:
    """One nn.ReLU called twice (torchvision's `self.relu`) makes one source partition with two
    outputs, which X86InductorQuantizer refuses; give each relu call its own partition."""
    for n in gm.graph.nodes:  # non-strict export leaves no source_fn_stack: partitions go by fqn
        if n.target in (torch.ops.aten.relu.default, torch.ops.aten.relu_.default):
            n.meta["source_fn_stack"] = [(n.name, torch.nn.ReLU)]


def fxpress_quantize(model, example, calibration, *, dynamic: bool = False,
                     reduce_range: bool = False, text: bool = False, options: dict | None = None):
    """(IR, how): our own fxpress.Quantize IR (a failure is the bench's failure, never a fallback).

    Text workloads use the shipped MiniLM recipe (fxpress/recipes/minilm_int8.yaml: linears,
    SmoothQuant 0.5, the 4 most sensitive FFN down-projections in float).
    `reduce_range`: int8 weights in [-64, 64], which ORT runs as exact s8 kernels on x86
    without VNNI (see fxpress.Quantize)."""
    import dataclasses

    import fxpress
    from fxpress.commands.demo import RECIPES
    mode = "dynamic" if dynamic else "static"
    if text:
        base = fxpress.Recipe.load(RECIPES / "minilm_int8.yaml").entries[0]
        q = dataclasses.replace(base, mode=mode, reduce_range=reduce_range)
        how = f"fxpress.Quantize {mode}, minilm_int8.yaml"
    else:
        q = fxpress.Quantize(mode=mode, reduce_range=reduce_range, **(options or {}))
        how = f"fxpress.Quantize {mode}" + "".join(f", {k}={v}" for k, v in (options or {}).items())
    cm = fxpress.compress(model, example, [q], calibration=calibration)
    return cm.graph_module, how + (", reduce_range" if reduce_range else "")


def export_onnx(model: torch.nn.Module, example: tuple, path: str, names: Sequence[str]) -> str:
    """fp32 ONNX via torch.onnx.export (dynamo), the way a user of ORT would make one."""
    torch.onnx.export(copy.deepcopy(model).eval(), tuple(example), path, input_names=list(names),
                      dynamo=True, external_data=False, verbose=False)
    return path


# intra-op threads of every ORT session the bench opens (peers and fxpress); None: one per
# physical core. bench/run.py sets it from --threads so all runners run alike.
THREADS: int | None = None
# ORT intra-op spin-waiting, the same for every ORT session of the bench (peers and fxpress).
# Off: the runners share one process and a shared 2-core box; spinning pool threads steal the
# cores the timed runner needs (measured, ResNet-18, load 12: ORT fp32 159 -> 116 ms, ORT
# quantize_static 65 -> 52 ms with spinning off). bench/run.py sets it from --ort-spinning.
SPINNING: bool = False


def ort_session(path_or_bytes, threads: int | None = None):
    import onnxruntime as ort
    from fxpress.backends.onnxruntime import session_options
    return ort.InferenceSession(path_or_bytes, session_options(threads or THREADS,
                                                               spinning=SPINNING),
                                providers=["CPUExecutionProvider"])


def ort_callable(sess) -> Callable:
    names = [i.name for i in sess.get_inputs()]

    def run(*inputs):
        feed = {n: x.numpy() for n, x in zip(names, inputs)}
        return torch.from_numpy(sess.run(None, feed)[0])
    return run


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over our batches."""

    def __init__(self, names, batches):
        self.it = iter([{n: x.numpy() for n, x in zip(names, b)} for b in batches])

    def get_next(self):
        return next(self.it, None)


class Peer:
    def __init__(self, name: str, build: Callable, kind: str):
        self.name, self.build, self.kind = name, build, kind  # kind: fp32 | static | dynamic


def _names(w) -> list[str]:
    return ["input_ids", "attention_mask"] if w.kind == "text" else ["x"]


def _ort_fp32(w, tmp):
    path = export_onnx(w.model, w.example, os.path.join(tmp, f"{w.name}_fp32.onnx"), _names(w))
    return ort_callable(ort_session(path)), os.path.getsize(path)


def ort_quantize_static(model, w, tmp, tag: str = ""):
    """ORT quantize_static of `model` (QDQ, per-channel s8 weights, u8 activations), with
    reduce_range on hosts without VNNI (fxpress.hw), as ORT documents for AVX2."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fxpress import hw
    host = hw.host()
    src = export_onnx(model, w.example, os.path.join(tmp, f"{w.name}{tag}_src.onnx"), _names(w))
    pre = os.path.join(tmp, f"{w.name}{tag}_pre.onnx")
    quant_pre_process(src, pre, skip_symbolic_shape=True)
    dst = os.path.join(tmp, f"{w.name}{tag}_qdq.onnx")
    quantize_static(pre, dst, _Reader(_names(w), w.calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=not (host.vnni or host.amx_int8))
    return ort_callable(ort_session(dst)), os.path.getsize(dst)


def _ort_static(w, tmp):
    return ort_quantize_static(w.model, w, tmp)


def torch_pruning(model: torch.nn.Module, example: tuple, ratio: float = 0.5) -> torch.nn.Module:
    """Torch-Pruning's documented recipe: global L2 group importance, channels rounded to 8,
    the classifier kept (the same choices fxpress.ChannelPruning(ratio) makes)."""
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    head = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MetaPruner(m, tuple(example),
                                  importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=True, round_to=8,
                                  ignored_layers=head)
    pruner.step()
    return m.eval()


def _tp_ort_static(w, tmp):
    return ort_quantize_static(torch_pruning(w.model, w.example, 0.5), w, tmp, "_tp50")


def _ort_dynamic(w, tmp):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src = export_onnx(w.model, w.example, os.path.join(tmp, f"{w.name}_src.onnx"), _names(w))
    dst = os.path.join(tmp, f"{w.name}_dyn.onnx")
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
    return ort_callable(ort_session(dst)), os.path.getsize(dst)


def _ort_fused_dynamic(w, tmp):
    """ORT's transformer optimizer (bert fusions) on the fp32 export, then quantize_dynamic."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    src = export_onnx(w.model, w.example, os.path.join(tmp, f"{w.name}_src.onnx"), _names(w))
    fused = os.path.join(tmp, f"{w.name}_fused.onnx")
    optimize_model(src, model_type="bert", opt_level=0).save_model_to_file(fused)
    dst = os.path.join(tmp, f"{w.name}_fused_dyn.onnx")
    quantize_dynamic(fused, dst, weight_type=QuantType.QInt8, per_channel=True)
    return ort_callable(ort_session(dst)), os.path.getsize(dst)


def _inductor_fp32(w, tmp):
    import fxpress
    run = fxpress.lower(w.model, "inductor", example_inputs=w.example)
    return run, _param_bytes(w.model)


def _torchao_inductor(w, tmp):
    gm = pt2e_quantize(w.model, w.example, w.calibration, dynamic=w.kind == "text")
    # The documented torchao flow: global freezing flag, restored afterwards.
    import torch._inductor.config as cfg
    with cfg.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(gm)
        compiled(*w.example)

    def run(*inputs):
        with cfg.patch(freezing=True), torch.no_grad():
            return compiled(*inputs)
    return run, _int8_bytes(gm)


def _openvino(w, tmp, *, int8: bool):
    """OpenVINO from the same fp32 ONNX export; int8: NNCF's documented PTQ (`nncf.quantize`,
    its defaults: mixed preset, fast bias correction) on the workload's calibration batches."""
    import openvino as ov
    src = export_onnx(w.model, w.example, os.path.join(tmp, f"{w.name}_ov_src.onnx"), _names(w))
    model = ov.convert_model(src)
    if int8:
        import nncf
        model = nncf.quantize(model, nncf.Dataset([tuple(x.numpy() for x in b) for b in w.calibration]),
                              subset_size=len(w.calibration))
    dst = os.path.join(tmp, f"{w.name}_ov{'_int8' if int8 else ''}.xml")
    ov.save_model(model, dst)
    # fp32 means fp32: OpenVINO's CPU plugin otherwise infers in bf16 on AVX512-BF16/AMX hosts
    # (measured here: 94.8 % top-1 agreement of its "fp32" EfficientNet-Lite0 with PyTorch)
    config = {"PERFORMANCE_HINT": "LATENCY", **({} if int8 else {"INFERENCE_PRECISION_HINT": "f32"})}
    if THREADS:
        config["INFERENCE_NUM_THREADS"] = THREADS
    compiled = ov.Core().compile_model(dst, "CPU", config)
    request = compiled.create_infer_request()

    def run(*inputs):
        out = request.infer([x.numpy() for x in inputs])
        return torch.from_numpy(next(iter(out.values())).copy())
    return run, os.path.getsize(dst.replace(".xml", ".bin"))


def _openvino_fp32(w, tmp):
    return _openvino(w, tmp, int8=False)


def _openvino_nncf(w, tmp):
    return _openvino(w, tmp, int8=True)


def _param_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def _int8_bytes(gm: torch.fx.GraphModule) -> int:
    return _param_bytes(gm)


PEERS = [
    Peer("ORT fp32", _ort_fp32, "fp32"),
    Peer("Inductor fp32", _inductor_fp32, "fp32"),
    Peer("ORT quantize_static (QDQ, per-channel)", _ort_static, "static"),
    Peer("ORT quantize_dynamic", _ort_dynamic, "dynamic"),
    Peer("ORT optimizer-fused + quantize_dynamic", _ort_fused_dynamic, "dynamic"),
    Peer("torchao PT2E -> Inductor", _torchao_inductor, "int8"),
    Peer("OpenVINO fp32", _openvino_fp32, "fp32"),
    Peer("OpenVINO + NNCF nncf.quantize", _openvino_nncf, "static"),
    # the combined recipe's peer (ResNet-18 only: bench/run.py PRUNED_WORKLOADS)
    Peer("Torch-Pruning 50% + ORT quantize_static", _tp_ort_static, "pruned_int8"),
]
