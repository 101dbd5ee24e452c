"""fx IR -> one ONNX model through torch.onnx's exporter (torchlib) and our Q/DQ rewrites.

    exported = export_onnx(gm, flat_example_inputs)
    exported.model            # onnx.ModelProto: dynamic dims as dim_param, QDQ in ORT's form
    exported.input_names      # one per tensor input of the IR, in placeholder order
    exported.rewrites         # {"bias_int32": 4, "weight_transpose": 2, ...}  (fuse.py)

The IR is re-exported with torch.export from a flat copy of it (positional tensors in, a
tuple of tensors out; the pytree structure stays with the Lowered), its dynamic dims named
as in `fxpress.ir.signature`, so "batch" in the IR is ``dim_param: "batch"`` in the .onnx.
torchlib translates every ATen op (type promotion included); `qdq.TRANSLATIONS` adds the
dynamic quantization ops it lacks.
"""
from __future__ import annotations

import copy
import functools
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import onnx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ...errors import LoweringError, UnsupportedOpError
from ...ir.meta import lineage
from ...ir.signature import output_names, signature
from ..stem import space_to_depth_stems
from .fuse import optimize_qdq
from .nbits import TRANSLATIONS as NBITS_TRANSLATIONS
from .nbits import has_weight_only, nbits_nodes, nbits_rewrites
from .qdq import TRANSLATIONS

__all__ = ["ExportedOnnx", "export_onnx", "flat_module", "has_vnni"]


def has_vnni() -> bool:
    """Whether this CPU multiplies u8 x s8 without int16 saturation (fxpress.hw decides)."""
    from ... import hw
    return bool(hw.host().vnni or getattr(hw.host(), "amx_int8", False))


@dataclass(frozen=True)
class ExportedOnnx:
    """One exported graph and how to feed it from the IR's flat inputs."""

    model: onnx.ModelProto
    input_index: tuple[int, ...]         # flat IR input -> ONNX input (tensor inputs only)
    input_names: tuple[str, ...]
    outputs: tuple[Any, ...]             # per flat IR output: None (an ONNX output) or a constant
    dynamic: dict = field(default_factory=dict)   # ONNX input name -> {dim: dim_param}
    rewrites: dict = field(default_factory=dict)
    seconds: float = 0.0


def flat_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[Any, ...]]:
    """A copy of `gm` taking its flat inputs positionally and returning a tuple of its tensor
    outputs; the second item holds, per flat output, None or the constant it always is."""
    f = copy.deepcopy(gm)
    f.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in f.graph.nodes if n.op == "output")
    leaves = pytree.tree_leaves(out.args[0])
    consts = tuple(None if isinstance(v, fx.Node) else v for v in leaves)
    out.args = (tuple(v for v in leaves if isinstance(v, fx.Node)),)
    _pin_contiguous(f.graph)
    f.graph.eliminate_dead_code()
    f.recompile()
    return f, consts


def _pin_contiguous(graph: fx.Graph) -> int:
    """``aten.contiguous(x)`` -> ``aten.clone(x, memory_format=contiguous)``.

    torch.onnx decomposes the graph on fake tensors, then re-runs it on new ones for type
    promotion; the two disagree on the strides of scaled_dot_product_attention's output (with
    a mask), so the first run drops T5's ``transpose(1, 2).contiguous()`` as a no-op, turns
    the reshape behind it into a view, and the second run cannot view the transposed tensor
    ("Cannot view a tensor with shape [s, 16, 2, 16]"). A clone is never dropped; it
    exports as Identity."""
    n = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.contiguous.default \
                and node.kwargs.get("memory_format", torch.contiguous_format) is torch.contiguous_format:
            node.target = torch.ops.aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
            n += 1
    return n


def _examples(gm: fx.GraphModule, flat: Sequence[Any]) -> tuple[list[Any], list[dict]]:
    """Inputs to re-export with, and torch.export dynamic_shapes keeping the IR's dynamic dims.

    A dynamic dim the example holds at size 0 or 1 would be specialized by export: the inputs
    used for the re-export take size 2 there (the graph is traced, not run on them)."""
    sig = signature(gm)
    dyn = sig.dynamic_dims()
    fits = len(flat) == len(sig.inputs) and all(
        (s.dtype is None) or (isinstance(x, torch.Tensor) and x.dim() == len(s.shape))
        for s, x in zip(sig.inputs, flat))
    if fits and not any(int(x.shape[i]) < 2 for x, d in zip(flat, dyn) for i in d):
        # clones: export marks the dims of the tensors it is given (the caller's stay unmarked)
        examples = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat]
    else:
        sizes = {k: max(2, v) for k, v in (sig.concrete(flat) if fits else {}).items()}
        examples = sig.examples(sizes)
        if fits:  # keep the non-tensor constants the graph was specialised on
            examples = [e if s.dtype is not None else x for s, e, x in zip(sig.inputs, examples, flat)]
    # Dim.DYNAMIC, not named Dims: export re-derives the ranges (a position table bounds the
    # sequence) and which dims are equal; _name_dims puts the IR's names back afterwards.
    shapes = [({i: torch.export.Dim.DYNAMIC for i in d} or None) if s.dtype is not None else None
              for s, d in zip(sig.inputs, dyn)]
    return examples, shapes


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name) if name.isidentifier() is False else name


def _module_of(gm: fx.GraphModule, op_text: str) -> tuple[str, str | None]:
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target) == op_text:
            lin = lineage(n)
            return str(n.target), (lin.module_path if lin is not None and lin.module_path else n.name)
    return op_text, None


@functools.lru_cache(maxsize=4)
def _registry(opset: int):
    """torchlib's registry with our translations, built once per process.

    torch.onnx.export rebuilds it on every call (measured 10.7 s of a 39 s ViT export on this
    box, loaded); its own `_core.export` takes a registry. None where that internal API is
    missing: the caller then goes through the public torch.onnx.export."""
    try:
        from torch.onnx._internal.exporter import _core, _registration  # noqa: F401
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    except Exception:  # another torch version: the public path works everywhere
        return None
    for op, fn in {**TRANSLATIONS, **NBITS_TRANSLATIONS}.items():
        registry.register_op(op, fn, is_complex=False)
    return registry


def _translate(ep, gm: fx.GraphModule, opset: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and torchvision notes
        try:
            registry = _registry(opset)
            if registry is None:
                return torch.onnx.export(ep, dynamo=True, optimize=True, verbose=False,
                                         opset_version=opset, custom_translation_table={
                                             **TRANSLATIONS, **NBITS_TRANSLATIONS})
            from torch.onnx._internal.exporter import _core
            return _core.export(ep, registry=registry, optimize=True, verbose=False,
                                opset_version=opset)
        except Exception as e:  # torch.onnx wraps its dispatch errors in several types
            text = str(e)
            m = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>",
                          text)
            if m:
                op, where = _module_of(gm, f"{m.group(1)}.{m.group(2)}")
                raise UnsupportedOpError(op, where, where="torch.onnx (torchlib has no function "
                                         "for it and fxpress no translation)", module=where) from e
            summary = text.split("## Exception summary")[-1].strip().splitlines()
            raise LoweringError("torch.onnx could not export the IR: "
                                f"{' '.join(summary[:2])[:600]}") from e


def _name_dims(model: onnx.ModelProto, specs) -> None:
    """Give the graph's dim_params the IR's names ("batch", not export's "s77") everywhere."""
    rename: dict[str, str] = {}
    for value, spec in zip(model.graph.input, specs):
        for d, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if d.dim_param and isinstance(want, str):
                rename.setdefault(d.dim_param, _ident(want))
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)


def _output_names(gm: fx.GraphModule, n: int) -> list[str]:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return output_names(info.out_spec if info is not None else None, n)


def _name_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Name the graph's outputs as the model's output fields ("last_hidden_state", "logits"),
    not the exporter's "view_27": the producing node's output is renamed (an Identity where
    the value is a graph input, an initializer or a second output)."""
    if len(names) != len(model.graph.output):
        return
    g = model.graph
    taken = {v for n in g.node for v in list(n.input) + list(n.output)} | \
        {i.name for i in g.input} | {i.name for i in g.initializer}
    fixed = {i.name for i in g.input} | {i.name for i in g.initializer}
    seen: set[str] = set()
    renamed: dict[str, str] = {}
    for out, want in zip(g.output, names):
        if out.name in renamed:  # the same value as an earlier output: read it under that name
            old = renamed[out.name]
            g.node.append(onnx.helper.make_node("Identity", [old], [want], name=f"{want}_identity"))
            out.name = want
            seen.add(want)
            continue
        want = _ident(want.replace(".", "_")) if not want.replace(".", "_").isidentifier() else want
        if out.name == want:
            seen.add(want)
            continue
        if want in taken or want in seen:
            continue  # the name is used by another value: keep the exporter's
        old = out.name
        if old in fixed or old in seen:
            g.node.append(onnx.helper.make_node("Identity", [old], [want], name=f"{want}_identity"))
        else:
            for n in g.node:
                for k, v in enumerate(n.output):
                    if v == old:
                        n.output[k] = want
                for k, v in enumerate(n.input):
                    if v == old:
                        n.input[k] = want
            for v in g.value_info:
                if v.name == old:
                    v.name = want
            renamed[old] = want
        out.name = want
        seen.add(want)
        taken.add(want)


def _scalar_qparams(model: onnx.ModelProto) -> None:
    """Declare DynamicQuantizeLinear's scale and zero point scalars, as the op makes them.

    The exporter gives them the shape torch's choose_qparams.tensor declares ([1]); ORT then
    warns on every one ("Error merging shape info ... source:{} target:{1}")."""
    qparams = {o for n in model.graph.node if n.op_type == "DynamicQuantizeLinear" for o in n.output[1:]}
    for v in model.graph.value_info:
        if v.name in qparams:
            v.type.tensor_type.shape.ClearField("dim")


def _reexport(f: fx.GraphModule, examples: Sequence[Any], shapes) -> torch.export.ExportedProgram:
    """torch.export of the flat IR (`shapes`: dynamic_shapes, or None for static); a failure is
    a LoweringError carrying the exporter's first line, its exception as the cause."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(f, tuple(examples), strict=False,
                                       dynamic_shapes=tuple(shapes) if shapes else None)
    except Exception as e:  # torch.export raises many types; name the step, keep the cause
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoweringError(f"re-export of the IR for ONNX failed: {first[:400]}") from e


def export_onnx(gm: fx.GraphModule, flat_inputs: Sequence[Any], *, int8_weights: str = "s8",
                opset: int = 20, space_to_depth: bool = True) -> ExportedOnnx:
    """Export the IR `gm` (called with `flat_inputs`) to ONNX in the QDQ form ORT fuses.

    `int8_weights`: "s8" keeps int8 weights, "u8" shifts them to uint8, "auto" shifts only the
    tensors u8 x s8 kernels without VNNI would saturate on (see fuse.shift_weights).
    `space_to_depth`: int8 strided stems become SpaceToDepth + a stride-1 conv (backends/stem.py).
    """
    t0 = time.perf_counter()
    f, consts = flat_module(gm)
    stems = space_to_depth_stems(f) if space_to_depth else 0  # exact; Pad(zp) -> DQ -> Conv folds below (fuse.py)
    examples, shapes = _examples(gm, flat_inputs)
    try:
        ep = _reexport(f, examples, shapes)
    except LoweringError as e:  # a dim the IR calls dynamic that a pass baked in (a reshape to
        # the example's batch): export static at the example's sizes, and say so once
        if not any(shapes):
            raise
        cause = e.__cause__
        reason = next((ln.strip() for ln in str(cause).splitlines() if ln.strip().startswith("- ")),
                      str(e))
        warnings.warn(f"ONNX export: the IR's dynamic dims cannot stay dynamic ({reason[:300]}); "
                      "the .onnx is static at the example's sizes", stacklevel=3)
        examples = [x.clone() if isinstance(x, torch.Tensor) else x for x in flat_inputs]
        ep = _reexport(f, examples, None)
    weight_only = has_weight_only(gm)  # blocked DequantizeLinear needs opset 21 (nbits.py)
    model = _translate(ep, gm, max(opset, 21) if weight_only else opset).model_proto
    _scalar_qparams(model)
    _name_dims(model, [signature(gm).inputs[i] for i, x in enumerate(examples)
                       if isinstance(x, torch.Tensor)])
    model, rewrites = optimize_qdq(model, int8_weights)
    if stems:
        rewrites["space_to_depth_stem"] = stems
    if weight_only:  # DQ -> MatMul of WeightOnly linears => MatMulNBits, q/k/v siblings fused,
        # RMSNorms and (static shapes only: it proves the mask causal) attention fused
        model, counts = nbits_rewrites(model)
        rewrites.update(matmul_nbits=len(nbits_nodes(model)), norms=counts["norms"],
                        gqa=counts["gqa"])
        rewrites = {k: v for k, v in rewrites.items() if v}
    _name_outputs(model, [n for n, c in zip(_output_names(gm, len(consts)), consts) if c is None])
    names = tuple(i.name for i in model.graph.input)
    index = tuple(i for i, x in enumerate(examples) if isinstance(x, torch.Tensor))
    if len(index) != len(names):
        raise LoweringError(f"the exported ONNX graph takes {len(names)} inputs, the IR "
                            f"{len(index)} tensor inputs")
    dynamic = {i.name: {k: d.dim_param for k, d in enumerate(i.type.tensor_type.shape.dim)
                        if d.dim_param} for i in model.graph.input}
    return ExportedOnnx(model, index, names, consts, {k: v for k, v in dynamic.items() if v},
                        rewrites, time.perf_counter() - t0)
