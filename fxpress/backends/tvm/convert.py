"""IR -> TVM Relax: our graph re-exported, decomposed, and imported with our quant converters.

    mod, info = to_relax(gm, (x,))     # tvm.IRModule with "main"; info.stats counts int8 lowerings

Float ops go through TVM's own importer (`from_exported_program`'s table); the
`quantized_decomposed` ops and int8 conv/linear go through `quant.QuantConverters`.
Every op is checked against both tables *before* importing, so an op nobody converts is an
`UnsupportedOpError` naming the op, the node and the module instead of TVM's assert.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ...errors import LoweringError, UnsupportedOpError
from ...ir.meta import lineage
from .quant import QUANT_OPS, QuantConverters

__all__ = ["to_exported_program", "to_relax", "graph_key", "RelaxImport"]

aten = torch.ops.aten

# Kept whole through decomposition: the int8 converters match them, and TVM converts them
# directly (decomposed, linear becomes permute+addmm and the dequantize->linear pattern is lost).
_KEEP = (aten.conv2d.default, aten.linear.default)


@dataclass
class RelaxImport:
    mod: object                      # tvm.IRModule
    key: str                         # graph hash: ops, literals, shapes, dtypes (not weight values)
    stats: dict[str, int] = field(default_factory=dict)


def _views_as_reshapes(gm: fx.GraphModule) -> int:
    """``aten.view`` -> ``aten.reshape`` in `gm` (the backend's flat copy): the same values, but
    re-export no longer needs the IR's strides to allow a view. HF GPT-2's Conv1D views the
    output of a reshape that re-export keeps as a non-contiguous view ("Cannot view a tensor
    with shape [2, 8, 32] and strides (32, 64, 1)")."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default
            n += 1
    if n:
        gm.recompile()
    return n


def to_exported_program(gm: fx.GraphModule, example_inputs: tuple) -> torch.export.ExportedProgram:
    _views_as_reshapes(gm)
    try:
        ep = torch.export.export(gm, tuple(example_inputs), strict=False)
        table = torch.export.default_decompositions()
        for op in _KEEP:
            table.pop(op, None)
        return ep.run_decompositions(table)
    except Exception as e:  # torch raises many types; say where it happened
        raise LoweringError(f"tvm backend: re-exporting the IR failed: {type(e).__name__}: {e}") from e


def normalize_negative_indices(ep: torch.export.ExportedProgram) -> int:
    """Rewrite ``select(x, dim, -i)`` to a non-negative index: TVM's importer reads a negative
    select index as an offset from 0 (garbage out, no error; an LSTM's ``y[:, -1]`` measured
    -inf dB vs the IR). A negative index into a dynamic dim is an UnsupportedOpError."""
    n_fixed = 0
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not aten.select.int:
            continue
        x, dim, index = node.args[:3]
        if not isinstance(index, int) or index >= 0:
            continue
        size = x.meta["val"].shape[dim] if isinstance(x, fx.Node) and "val" in x.meta else None
        if not isinstance(size, int):
            raise UnsupportedOpError(node.target, node, where="tvm backend (a negative select index "
                                     "into a dynamic dim)", module=_module_of(node))
        node.args = (x, dim, index + size, *node.args[3:])
        n_fixed += 1
    if n_fixed:
        ep.graph_module.recompile()
    return n_fixed


def explicit_cumsum_dtypes(ep: torch.export.ExportedProgram) -> int:
    """Give ``cumsum`` of a bool/int tensor its result dtype explicitly: torch promotes
    ``cumsum(bool)`` to int64, TVM's importer keeps bool (HF GPT-2's padding-mask positions:
    a wrong value, then an LLVM `fcmp` on i1 that does not compile)."""
    n_fixed = 0
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not aten.cumsum.default:
            continue
        x, out = node.args[0], node.meta.get("val")
        xv = x.meta.get("val") if isinstance(x, fx.Node) else None
        if len(node.args) > 2 or node.kwargs.get("dtype") is not None or out is None or xv is None \
                or out.dtype == xv.dtype:
            continue
        node.kwargs = {**node.kwargs, "dtype": out.dtype}
        n_fixed += 1
    if n_fixed:
        ep.graph_module.recompile()
    return n_fixed


def _module_of(node: fx.Node) -> str | None:
    rec = lineage(node)
    if rec is not None and rec.module_path:
        return rec.module_path
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def check_supported(ep: torch.export.ExportedProgram, tvm_names: set[str]) -> None:
    """Raise UnsupportedOpError for the first op neither TVM's table nor ours converts."""
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if t in QUANT_OPS or t in _KEEP:
            continue
        if isinstance(t, torch._ops.OpOverload):
            # TVM keys its table by "name.overload" only: accept aten ops alone, or a custom
            # op that shares an aten name would be silently translated as the aten one.
            ok = t.namespace == "aten" and t.__name__ in tvm_names
        else:
            ok = getattr(t, "__module__", "") in ("_operator", "operator") and t.__name__ in tvm_names
        if not ok:
            raise UnsupportedOpError(t, node, where="tvm backend", module=_module_of(node))


def graph_key(ep: torch.export.ExportedProgram) -> str:
    """Hash of what schedules depend on: ops, literal args, shapes and dtypes (not weights)."""
    h = hashlib.sha256()
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        sig = (tuple(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else None
        args = [a.name if isinstance(a, fx.Node) else repr(a) for a in node.args]
        h.update(f"{node.op}|{node.target}|{args}|{sorted(node.kwargs)}|{sig}\n".encode())
    return h.hexdigest()[:24]


def _constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    by_target = {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}
    return {spec.arg.name: by_target[spec.target] for spec in ep.graph_signature.input_specs
            if spec.target in by_target}


def to_relax(gm: fx.GraphModule, example_inputs: tuple) -> RelaxImport:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    ep = to_exported_program(gm, example_inputs)
    importer = ExportedProgramImporter()
    check_supported(ep, set(importer.convert_map))
    stats: dict[str, int] = {}
    for key, fix in (("negative_select_fixed", normalize_negative_indices),
                     ("cumsum_dtype_fixed", explicit_cumsum_dtypes)):
        fixed = fix(ep)
        if fixed:
            stats[key] = fixed
    conv = QuantConverters(importer, _constants(ep), stats)
    try:
        mod = importer.from_exported_program(ep, False, False, False, conv.string_map())
    except UnsupportedOpError:
        raise
    except Exception as e:
        raise LoweringError(f"tvm backend: Relax import failed: {type(e).__name__}: {e}") from e
    return RelaxImport(mod, graph_key(ep), stats)
