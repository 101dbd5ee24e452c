"""Our own fx IR -> ONNX emitter: a translation table keyed by aten op objects.

    model = emit_onnx(gm, example_inputs)          # onnx.ModelProto
    onnx.checker.check_model(model)

Why not the dynamo exporter: it decomposes the Q/DQ graph into a form ONNX Runtime does not
fuse (int8 weights dequantized by ops instead of initializers, ...), and an int8 ResNet-18 then
runs 2.5x slower than fp32 (../shared/NOTES.md). Here each `quantized_decomposed` op maps to one
QuantizeLinear/DequantizeLinear with an int8 initializer, in the QDQ form ORT's selectors fuse.

Values: every fx node maps to an ONNX value name (str) or, when all its inputs are constants,
to a torch constant computed here at emission time (shape arithmetic, masks built from
`arange`, position ids): constants become initializers only where an ONNX node reads them.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import TensorProto, helper, numpy_helper

from ...errors import UnsupportedOpError
from ...ir.meta import lineage

__all__ = ["Emitter", "emit_onnx", "has_vnni", "register", "TABLE", "OPSET", "supported", "NO_FOLD"]

OPSET = 21
# aten/quantized_decomposed op object -> handler(em, node) returning ONNX name(s).
TABLE: dict[Any, Callable[["Emitter", fx.Node], Any]] = {}
# ops never constant-folded here: folding them would erase the Q/DQ structure ORT fuses.
NO_FOLD: set = set()

_ONNX_DTYPE = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8, torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL, torch.int16: TensorProto.INT16,
}


def onnx_dtype(dtype: torch.dtype) -> int:
    if dtype not in _ONNX_DTYPE:
        raise UnsupportedOpError(f"dtype {dtype}", where="ONNX emitter")
    return _ONNX_DTYPE[dtype]


def register(*ops, fold: bool = True):
    """Decorator: `handler(em, node)` translates each of `ops`."""
    def deco(fn):
        for op in ops:
            TABLE[op] = fn
            if not fold:
                NO_FOLD.add(op)
        return fn
    return deco


def supported(node: fx.Node) -> bool:
    """Whether the emitter can translate `node` (placeholders/outputs/get_attr always can)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return True
    return node.op == "call_function" and (node.target in TABLE or node.target is operator.getitem)


def _is_const(v) -> bool:
    return not isinstance(v, str)


class Emitter:
    """Walks a graph once, appending ONNX nodes; handlers use `v`, `const`, `add`, `val`."""

    def __init__(self, gm: fx.GraphModule, name: str = "fxpress", *, int8_weights: str = "s8"):
        self.gm, self.name = gm, name
        self.int8_weights = int8_weights  # s8 | u8 | auto (per tensor; see qdq.s8_exact)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.env: dict[fx.Node, Any] = {}
        self._const_names: dict[int, str] = {}
        self._keepalive: list = []
        self._count = 0
        self.current: fx.Node | None = None
        self.opsets = {"": OPSET}
        self.dynamic_q: dict[str, str] = {}  # scale name -> DynamicQuantizeLinear's u8 output

    # -- names and constants ------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, hint: str = "c", dtype: torch.dtype | None = None) -> str:
        """An initializer holding `value` (tensor, array, or Python scalar/list)."""
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if dtype is not None:
                t = t.to(dtype)
            key = id(value) if dtype is None else None
            if key is not None and key in self._const_names:
                return self._const_names[key]
            arr = t.contiguous().numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
        else:
            arr = np.asarray(value)
            if dtype is not None:
                arr = arr.astype(torch.empty(0, dtype=dtype).numpy().dtype)
            elif arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            key = None
        name = self.fresh(hint.replace(".", "_"))
        self.initializers[name] = numpy_helper.from_array(np.array(arr, order="C", copy=True), name)  # keeps 0-d scalars 0-d
        if key is not None:
            self._const_names[key] = name
            self._keepalive.append(value)
        return name

    def v(self, arg, dtype: torch.dtype | None = None) -> str:
        """The ONNX name of an fx argument (constants become initializers)."""
        if isinstance(arg, fx.Node):
            val = self.env[arg]
            if isinstance(val, str):
                return val
            return self.const(val if isinstance(val, torch.Tensor) else torch.tensor(val),
                              arg.name, dtype)
        if isinstance(arg, torch.Tensor):
            return self.const(arg, "c", dtype)
        return self.const(torch.tensor(arg, dtype=dtype) if dtype else torch.tensor(arg), "c")

    def value(self, arg):
        """The Python value of an argument: constants and literals as is, ONNX names as str."""
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def val(self, arg) -> torch.Tensor | None:
        """The FakeTensor (shape/dtype) recorded on an fx argument, or the constant itself."""
        if isinstance(arg, fx.Node):
            c = self.env.get(arg)
            if isinstance(c, torch.Tensor):
                return c
            return arg.meta.get("val")
        if isinstance(arg, torch.Tensor):
            return arg
        return None

    def ints(self, values: Sequence[int], hint: str = "shape") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint)

    def add(self, op_type: str, inputs: Sequence[str | None], n_out: int = 1, *,
            domain: str = "", hint: str | None = None, **attrs) -> Any:
        """Append one ONNX node; returns its output name (or names when n_out > 1)."""
        base = hint or (self.current.name if self.current is not None else op_type.lower())
        outs = [self.fresh(base) for _ in range(n_out)]
        ins = ["" if i is None else i for i in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        name = self.fresh(f"{op_type}")
        node = helper.make_node(op_type, ins, outs, name=name, domain=domain or None, **attrs)
        if self.current is not None:  # the user's module path travels into the .onnx for profiling
            lin = lineage(self.current)
            if lin is not None and lin.module_path:
                node.doc_string = lin.module_path
        self.nodes.append(node)
        if domain:
            self.opsets.setdefault(domain, 1)
        return outs[0] if n_out == 1 else outs

    # -- the walk --------------------------------------------------------------
    def run(self) -> onnx.ModelProto:
        inputs, outputs = [], []
        for node in self.gm.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                meta = node.meta.get("val")
                if not isinstance(meta, torch.Tensor):
                    raise UnsupportedOpError("non-tensor graph input", node, where="ONNX emitter")
                inputs.append(helper.make_tensor_value_info(node.name, onnx_dtype(meta.dtype),
                                                            list(meta.shape)))
                self.env[node] = node.name
            elif node.op == "get_attr":
                self.env[node] = _fetch_attr(self.gm, node.target)
            elif node.op == "call_function":
                self.env[node] = self._call(node)
            elif node.op == "output":
                flat = torch.utils._pytree.tree_leaves(node.args[0])
                for i, out in enumerate(flat):
                    src = self.v(out)
                    name = f"output_{i}"
                    self.add("Identity", [src], hint=name)
                    self.nodes[-1].output[0] = name
                    meta = self.val(out)
                    outputs.append(helper.make_tensor_value_info(
                        name, onnx_dtype(meta.dtype), list(meta.shape)))
            else:
                raise UnsupportedOpError(node.op, node, where="ONNX emitter",
                                         module=_module(node))
        self.current = None
        self._prune([o.name for o in outputs])
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs,
                                  list(self.initializers.values()))
        opsets = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="fxpress")
        model.ir_version = 10
        return model

    def _prune(self, outputs: list[str]) -> None:
        """Drop nodes and initializers nothing reads (e.g. a DQ a fused handler bypassed)."""
        live, kept = set(outputs), []
        for n in reversed(self.nodes):
            if any(o in live for o in n.output):
                kept.append(n)
                live.update(i for i in n.input if i)
        self.nodes = kept[::-1]
        self.initializers = {k: v for k, v in self.initializers.items() if k in live}

    def _call(self, node: fx.Node):
        if node.target is operator.getitem:
            seq = self.value(node.args[0])
            return seq[node.args[1]]
        args = [a for a in node.all_input_nodes]
        if node.target not in NO_FOLD and all(_is_const(self.env[a]) for a in args) \
                and _foldable(node):
            return _evaluate(node, self.value)
        fn = TABLE.get(node.target)
        if fn is None:
            raise UnsupportedOpError(node.target, node, where="ONNX emitter", module=_module(node))
        return fn(self, node)


def _foldable(node: fx.Node) -> bool:
    # a node with no tensor inputs and a random/size-free result is still static here: export
    # specialised shapes, so arange/zeros/new_ones fold to the same constant on every run.
    return not getattr(node.target, "_nondeterministic_seeded", False)


def _evaluate(node: fx.Node, value: Callable):
    args = torch.fx.node.map_arg(node.args, lambda n: value(n))
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: value(n))
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Parameter):
        return obj.data
    return obj


def _module(node: fx.Node) -> str | None:
    lin = lineage(node)
    return lin.module_path if lin is not None and lin.module_path else None


def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (u8 x s8 dot products without int16 saturation)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return True
    return any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def emit_onnx(gm: fx.GraphModule, example_inputs: Sequence | None = None, *,
              name: str = "fxpress", int8_weights: str = "auto") -> onnx.ModelProto:
    """Translate the IR (fp32, pruned, factorized or Q/DQ-quantized) to an ONNX model.

    `int8_weights`: "s8" keeps int8 weights; "u8" shifts them to uint8 (same values). On x86
    without VNNI, ORT's u8 x s8 kernels use vpmaddubsw, whose int16 pair sums saturate on
    weights beyond [-64, 64] (measured: digits CNN 22.8 dB SQNR vs the IR, 0.3 pt accuracy
    lost); its u8 x u8 kernels are exact but ~1.4x slower. "auto": s8 on VNNI CPUs; without
    VNNI, s8 for each weight tensor within [-64, 64] (``Quantize(reduce_range=True)``) and u8
    for the others, so every kernel is exact and the safe ones run at full speed.
    """
    from ...recipe import check_choice
    check_choice("int8_weights", int8_weights, ["auto", "s8", "u8"])
    mode = "s8" if int8_weights == "auto" and has_vnni() else int8_weights
    from . import ops, qdq  # noqa: F401  (fill TABLE)
    from ...passes.analysis.shape_prop import propagate_shapes
    propagate_shapes(gm, example_inputs)  # refreshes meta["val"] only; the graph is not changed
    return Emitter(gm, name, int8_weights=mode).run()
