"""ORT's transformer optimizer on a transformer graph, kept only when it times faster here.

``onnxruntime.transformers.optimizer`` (and onnxscript's ORT fusions, which match torch.onnx's
graphs) fuse attention, SkipLayerNorm and BiasGelu; on one
AVX2 box its fused fp32 MiniLM ran slower (0.81x) than the plain export (../shared/NOTES.md),
so the lowering measures both graphs on the example inputs and records the decision:

    model, decision = maybe_fuse(model, exported, flat_inputs)
    decision  # {'applied': False, 'plain_ms': 4.1, 'fused_ms': 4.6, 'timed_on': '1x128 x 1x128', ...}
"""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
from collections.abc import Sequence
from typing import Any

import onnx

__all__ = ["is_transformer", "maybe_fuse"]


def is_transformer(model: onnx.ModelProto) -> bool:
    """An attention graph: a Softmax and MatMuls (LayerNorm or RMSNorm around them)."""
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return bool(ops["Softmax"] and ops["MatMul"] + ops["DynamicQuantizeMatMul"] >= 2)


@contextlib.contextmanager
def _quiet(logger: str):
    """Only errors from `logger` while the block runs."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _ort_optimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model
    # its fusion chatter, scoped to this call
    with _quiet("onnxruntime.transformers"), contextlib.redirect_stdout(io.StringIO()):
        # opt_level=0: only its Python fusions; ORT's own optimizer runs when the session opens
        return optimize_model(model, model_type="bert", opt_level=0).model


def _ort_fusions(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's ORT fusions, written for torch.onnx (dynamo) graphs: the same fused ops
    (SkipLayerNormalization, BiasGelu, MultiHeadAttention ...) on patterns the bert optimizer,
    written for the TorchScript exporter's graphs, does not recognise."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    m = ir.serde.deserialize_model(model)
    # its constant folder logs a warning per Reshape it cannot evaluate on symbolic shapes
    # ("Evaluation failed: cannot reshape array ..."): chatter, scoped to this call
    with _quiet("onnxscript.optimizer._constant_folding"):
        optimize_for_ort(m)
    return ir.serde.serialize_model(m)


# tried in order; the first that changes the graph is timed against the plain graph.
# onnxscript's first: our graphs come from torch.onnx, whose patterns the bert optimizer
# (written for the TorchScript exporter) does not match on MiniLM - it spent 5.9 s of a
# loaded box's lowering to find no fusion.
_OPTIMIZERS = (("onnxscript ort_fusions", _ort_fusions),
               ("onnxruntime.transformers.optimizer (bert)", _ort_optimizer))


def _new_ops(before: onnx.ModelProto, after: onnx.ModelProto) -> dict:
    a = collections.Counter(n.op_type for n in before.graph.node)
    b = collections.Counter(n.op_type for n in after.graph.node)
    return {k: v for k, v in b.items() if a.get(k, 0) < v}


def maybe_fuse(model: onnx.ModelProto, exported, flat_inputs: Sequence[Any], *,
               forced: bool = False, threads: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """(model to run, decision record). Non-transformer graphs are returned unchanged."""
    if not is_transformer(model):
        return model, {"applied": False, "why": "not a transformer graph"}
    fused, new_ops, tried = None, {}, []
    for name, fn in _OPTIMIZERS:
        try:
            cand = fn(copy.deepcopy(model))
        except Exception as e:  # their pattern matchers assume graph forms they do not check
            tried.append(f"{name}: failed ({type(e).__name__})")
            continue
        new_ops = _new_ops(model, cand)
        if new_ops:
            fused, by = cand, name
            break
        tried.append(f"{name}: no fusion matched")
    if fused is None:
        return model, {"applied": False, "why": "; ".join(tried)}
    if forced:
        return fused, {"applied": True, "by": by, "why": "transformer_fusion='on'",
                       "fused_ops": new_ops}
    from ...timing import interleaved_medians
    from ..onnxruntime import _Session
    feeds, timed_on = _timing_feeds([flat_inputs[i] for i in exported.input_index], exported)
    try:
        plain, opt = _Session(model, threads, "all"), _Session(fused, threads, "all")
        ms = interleaved_medians({"plain": lambda *a: plain(*a), "fused": lambda *a: opt(*a)},
                                 feeds, rounds=10, warmup=2)
        agree = min(_sqnr(a, b) for a, b in zip(plain(*feeds), opt(*feeds)))
    except Exception as e:  # a fused graph ORT refuses is not used
        return model, {"applied": False, "why": f"fused graph failed: {type(e).__name__}: {e}"}
    if agree < 40.0:  # a fusion that changes the answer is a bug in its matcher, not a speed-up
        return model, {"applied": False, "by": by, "why": f"fused outputs {agree:.1f} dB off"}
    applied = ms["fused"] < ms["plain"]
    return (fused if applied else model), {
        "applied": applied, "by": by, "plain_ms": round(ms["plain"], 3), "fused_ms": round(ms["fused"], 3),
        "why": "timed faster" if applied else "timed slower", "timed_on": timed_on,
        "fused_ops": new_ops}


def _timing_feeds(feeds: list, exported) -> tuple[list, str]:
    """The inputs both graphs are timed on: the example, cut to one row where every input's
    dim 0 is dynamic (the batch) (the fusions change per-row kernels - attention,
    LayerNorm, GELU - so one row ranks the two graphs as the batch does, at 1/batch of the
    cost: MiniLM 8 x 128 spent ~20 s of its lowering timing two sessions on the full batch).
    A static graph is timed on the example as it is."""
    import torch
    names = exported.input_names
    batched = feeds and all(
        isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > 1
        and exported.dynamic.get(n, {}).get(0) for x, n in zip(feeds, names)) \
        and len({x.shape[0] for x in feeds}) == 1
    if batched:  # equal in the example, so one row of each stays consistent
        feeds = [x[:1].contiguous() for x in feeds]
    return feeds, " x ".join("x".join(map(str, x.shape)) for x in feeds
                             if isinstance(x, torch.Tensor))


def _sqnr(ref, y) -> float:
    import torch
    ref, y = ref.double(), y.double()
    if not torch.is_floating_point(ref):
        return float("inf") if torch.equal(ref, y) else 0.0
    err = (ref - y).pow(2).mean()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.pow(2).mean() / err))
