"""ORT's transformer optimizer on a transformer graph, kept only when it times faster here.

``onnxruntime.transformers.optimizer`` fuses attention, SkipLayerNorm and BiasGelu; on one
AVX2 box its fused fp32 MiniLM ran slower (0.81x) than the plain export (../shared/NOTES.md),
so the lowering measures both graphs on the example inputs and records the decision:

    model, decision = maybe_fuse(model, exported, flat_inputs)
    decision  # {'applied': False, 'plain_ms': 4.1, 'fused_ms': 4.6, 'fused_ops': {...}}
"""
from __future__ import annotations

import collections
import io
import contextlib
import logging
from typing import Any, Sequence

import onnx

__all__ = ["is_transformer", "maybe_fuse"]


def is_transformer(model: onnx.ModelProto) -> bool:
    """An attention graph: a Softmax between MatMuls, and a LayerNormalization."""
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return bool(ops["Softmax"] and ops["LayerNormalization"] and
                ops["MatMul"] + ops["DynamicQuantizeMatMul"] >= 2)


def _fused(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model
    log = logging.getLogger("onnxruntime.transformers")  # its fusion chatter, scoped to this call
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            # opt_level=0: only its Python fusions; ORT's own optimizer runs when the session opens
            return optimize_model(model, model_type="bert", opt_level=0).model
    finally:
        log.setLevel(level)


def maybe_fuse(model: onnx.ModelProto, exported, flat_inputs: Sequence[Any], *,
               forced: bool = False, threads: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """(model to run, decision record). Non-transformer graphs are returned unchanged."""
    if not is_transformer(model):
        return model, {"applied": False, "why": "not a transformer graph"}
    try:
        fused = _fused(model)
    except Exception as e:  # its pattern matchers assume graph forms they do not check
        return model, {"applied": False, "why": f"optimizer failed: {type(e).__name__}: {e}"}
    before = collections.Counter(n.op_type for n in model.graph.node)
    after = collections.Counter(n.op_type for n in fused.graph.node)
    new_ops = {k: v for k, v in after.items() if before.get(k, 0) < v}
    if not new_ops:
        return model, {"applied": False, "why": "no fusion matched"}
    if forced:
        return fused, {"applied": True, "why": "transformer_fusion='on'", "fused_ops": new_ops}
    from ...timing import interleaved_medians
    from ..onnxruntime import _Session
    feeds = [flat_inputs[i] for i in exported.input_index]
    try:
        plain, opt = _Session(model, threads, "all"), _Session(fused, threads, "all")
        ms = interleaved_medians({"plain": lambda *a: plain(*a), "fused": lambda *a: opt(*a)},
                                 feeds, rounds=10, warmup=2)
    except Exception as e:  # a fused graph ORT refuses is not used
        return model, {"applied": False, "why": f"fused graph failed: {type(e).__name__}: {e}"}
    applied = ms["fused"] < ms["plain"]
    return (fused if applied else model), {
        "applied": applied, "plain_ms": round(ms["plain"], 3), "fused_ms": round(ms["fused"], 3),
        "why": "timed faster" if applied else "timed slower", "fused_ops": new_ops}
