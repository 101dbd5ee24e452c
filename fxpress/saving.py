"""A compressed model is a file: ``cm.save(path)`` and ``fxpress.load(path)``.

    cm.save("digits_int8.fxp")                   # the IR, its records, recipe and report
    cm = fxpress.load("digits_int8.fxp")         # in any process: a CompressedModel again
    run = fxpress.load("digits_int8.onnx")       # any backend's artefact, behind the same checked call

What a CompressedModel file holds (one ``torch.save`` zip, written atomically):

- the IR graph node by node (op, name, target, args, kwargs) with every picklable ``node.meta``
  entry, so the typed records (``fxpress.ir.meta``: QuantSpec, ObserverStats, Lineage, ...) and
  node names come back as they were; FakeTensor values are not stored, they are re-propagated
  from the saved example inputs on load;
- the pytree in/out specs (a keyword-captured HF model is called ``model(**enc)`` again and
  returns its ModelOutput), the input signature (dynamic dims), ``gm.meta``;
- every tensor the graph reads, as the IR holds it: int8 weights stay int8; int8 tensors whose
  values all lie in [-8, 7] (int4 weights) are packed two to a byte (lossless); Parameters stay
  Parameters and tied ones stay tied, so ``fxpress.load(path)`` fine-tunes as before;
- the recipe (its YAML list), the report, the example inputs.

Outputs of the reloaded model are bit-identical to the saved one's. The file is a pickle: load
only files you trust (as with ``torch.load(weights_only=False)``). ``torch.save(cm, path)``
works too (it stores the same state; reload with ``torch.load(path, weights_only=False)``).

``fxpress.load`` dispatches on what the path holds: a CompressedModel file, an ``.onnx`` (ONNX
Runtime), an AOTInductor ``.pt2`` package, a torch.export ``.pt2`` program (the eager backend's
artefact), a TVM ``.so``, or a folder with ``genai_config.json`` (ORT GenAI). Each comes back
as a callable that checks its inputs against the signature saved with it (an ``InputError``
names the input) and returns the model's output structure where the artefact recorded it.
"""
from __future__ import annotations

import contextlib
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .errors import InputError
from .utils import quiet_torch

__all__ = ["save", "load", "state_of", "from_state", "FORMAT", "SUFFIXES", "check_suffix",
           "quiet_torch"]

FORMAT = "fxpress.CompressedModel"
VERSION = 1
# the artefact each backend writes, by suffix (a wrong suffix is a RecipeError, see check_suffix)
SUFFIXES = {"compressed": ".fxp", "eager": ".pt2", "inductor": ".pt2", "onnxruntime": ".onnx",
            "tvm": ".so"}
# node.meta entries that hold FakeTensors or torch's own provenance: re-made, not stored
_TRANSIENT_META = ("val", "tensor_meta", "example_value", "unbacked_bindings", "from_node")


# ------------------------------------------------------------------ suffixes
def check_suffix(path, backend: str) -> Path:
    """`path` as a Path, or a RecipeError when its suffix is not `backend`'s artefact's."""
    from .errors import RecipeError
    p = Path(path)
    want = SUFFIXES.get(backend)
    if want is not None and p.suffix.lower() != want:
        raise RecipeError(f"the {backend} artefact is a {want} file, not {p.name!r}",
                          field="path", value=str(path), accepted=[f"*{want}"])
    return p


# ------------------------------------------------------------------ graph <-> state
@dataclass(frozen=True)
class _Ref:
    """A reference to an earlier node in a saved graph's args."""
    name: str


@dataclass(frozen=True)
class _Packed4:
    """An int8 tensor of int4 values, two to a byte (low nibble first)."""
    shape: tuple
    data: torch.Tensor

    @staticmethod
    def pack(t: torch.Tensor) -> "_Packed4":
        flat = (t.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return _Packed4(tuple(t.shape), (flat[0::2] | (flat[1::2] << 4)).contiguous())

    def unpack(self) -> torch.Tensor:
        lo = (self.data & 0xF).to(torch.int8)
        hi = (self.data >> 4).to(torch.int8)
        vals = torch.stack([lo, hi], 1).reshape(-1)
        vals = torch.where(vals >= 8, vals - 16, vals)  # sign-extend the nibbles
        n = 1
        for s in self.shape:
            n *= s
        return vals[:n].reshape(self.shape).contiguous()


@dataclass(frozen=True)
class _Fill:
    """A tensor whose elements are all one value (weight zero points): its shape, dtype, value."""
    shape: tuple
    dtype: torch.dtype
    value: Any

    def unpack(self) -> torch.Tensor:
        return torch.full(self.shape, self.value, dtype=self.dtype)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a compact copy where it views a larger storage (torch.save writes whole storages:
    a batch-1 example sliced from a batch of 48 images would store all 48)."""
    if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() <= t.numel() * t.element_size():
        return t
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(t.detach().clone(), t.requires_grad)
    return t.detach().clone()


def _stored(t: torch.Tensor) -> Any:
    """How one tensor goes to disk: Parameters as they are; constant buffers as their value;
    int4 values two to a byte; anything else as the IR holds it (int8 weights stay int8)."""
    if isinstance(t, torch.nn.Parameter):
        return _own_storage(t)
    t = t.detach()
    if t.numel() >= 8 and not t.is_complex() and bool((t == t.reshape(-1)[0]).all()):
        return _Fill(tuple(t.shape), t.dtype, t.reshape(-1)[0].item())
    return _Packed4.pack(t) if _is_int4(t) else _own_storage(t)


def _is_int4(t: torch.Tensor) -> bool:
    return (t.dtype == torch.int8 and not isinstance(t, torch.nn.Parameter) and t.numel() >= 64
            and bool(((t >= -8) & (t <= 7)).all()))


def _target_of(node: fx.Node) -> Any:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        ns, name = t.name().split("::", 1)
        return ("op", ns, name.split(".")[0], t._overloadname)
    if isinstance(t, torch._ops.OpOverloadPacket):
        ns, name = t._qualified_op_name.split("::", 1)
        return ("packet", ns, name)
    if isinstance(t, torch._ops.HigherOrderOperator):
        return ("hop", t.name())
    return t  # str (get_attr, call_module, call_method) or a picklable Python callable


def _resolve_target(t: Any) -> Any:
    if isinstance(t, tuple) and t and t[0] in ("op", "packet", "hop"):
        if t[0] == "hop":
            return getattr(torch.ops.higher_order, t[1])
        packet = getattr(getattr(torch.ops, t[1]), t[2])
        return packet if t[0] == "packet" else getattr(packet, t[3])
    return t


def _picklable(v: Any) -> bool:
    try:
        pickle.dumps(v)
        return True
    except Exception:  # noqa: BLE001  (anything unpicklable is simply not stored)
        return False


def _graph_state(gm: fx.GraphModule, tensors: dict) -> dict:
    """The graph of `gm` as plain data; tensors/modules it reads are added to `tensors`."""
    nodes, modules = [], {}
    for n in gm.graph.nodes:
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: _Ref(a.name))
        meta = {k: v for k, v in n.meta.items() if k not in _TRANSIENT_META and _picklable(v)}
        nodes.append({"op": n.op, "name": n.name, "target": _target_of(n), "args": args[0],
                      "kwargs": args[1], "meta": meta, "type": n.type})
        if n.op == "get_attr":
            obj = _fetch(gm, n.target)
            if isinstance(obj, fx.GraphModule):
                modules[n.target] = ("graph", _graph_state(obj, {}), )
            elif isinstance(obj, torch.Tensor):
                tensors[n.target] = obj
            else:
                modules[n.target] = ("object", obj)
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            modules[n.target] = (("graph", _graph_state(mod, {})) if isinstance(mod, fx.GraphModule)
                                 else ("module", mod))
    # the buffers' persistence and which tensors are Parameters, by path
    persistent = {}
    for name, mod in gm.named_modules():
        for b in mod._buffers:
            persistent[f"{name}.{b}" if name else b] = b not in mod._non_persistent_buffers_set
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return {"nodes": nodes, "modules": modules, "persistent": persistent,
            "pytree": None if info is None else {
                "orig_args": list(info.orig_args),
                "in_spec": _dumps_spec(info.in_spec), "out_spec": _dumps_spec(info.out_spec)},
            "meta": {k: v for k, v in gm.meta.items() if _picklable(v)}}


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _dumps_spec(spec) -> Any:
    if spec is None:
        return None
    import torch.utils._pytree as pytree
    with quiet_torch():
        try:
            return ("json", pytree.treespec_dumps(spec))
        except Exception:  # noqa: BLE001  (a type without a serialized name: pickle it)
            return ("pickle", pickle.dumps(spec))


def _loads_spec(s: Any):
    if s is None:
        return None
    import importlib
    import json
    import torch.utils._pytree as pytree
    kind, data = s
    with quiet_torch():
        if kind == "pickle":
            return pickle.loads(data)
        # import the modules that register the spec's node types (transformers' ModelOutputs)
        for mod in _spec_modules(json.loads(data)):
            with contextlib.suppress(ImportError):
                importlib.import_module(mod)
        return pytree.treespec_loads(data)


def _spec_modules(obj) -> set[str]:
    out = set()
    if isinstance(obj, dict):
        t = obj.get("type")
        if isinstance(t, str) and "." in t:
            out.add(t.rsplit(".", 1)[0])
        for v in obj.values():
            out |= _spec_modules(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _spec_modules(v)
    return out


def _install(root: torch.nn.Module, path: str, value: Any, persistent: bool = True) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, torch.nn.Module())
        mod = getattr(mod, p)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(leaf, value)
    elif isinstance(value, torch.Tensor):
        mod.register_buffer(leaf, value, persistent=persistent)
    elif isinstance(value, torch.nn.Module):
        mod.add_module(leaf, value)
    else:
        setattr(mod, leaf, value)


def _build_graph_module(state: dict, tensors: dict) -> fx.GraphModule:
    root = torch.nn.Module()
    for path, t in tensors.items():
        _install(root, path, t, state["persistent"].get(path, True))
    for path, (kind, obj) in state["modules"].items():
        _install(root, path, _build_graph_module(obj, tensors) if kind == "graph" else obj)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for rec in state["nodes"]:
        args, kwargs = _unref((rec["args"], rec["kwargs"]), env)
        node = graph.create_node(rec["op"], _resolve_target(rec["target"]), tuple(args), dict(kwargs),
                                 name=rec["name"], type_expr=rec["type"])
        node.meta.update(rec["meta"])
        env[rec["name"]] = node
    if state["pytree"] is not None:
        p = state["pytree"]
        graph.set_codegen(fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(
            p["orig_args"], _loads_spec(p["in_spec"]), _loads_spec(p["out_spec"]))))
    gm = fx.GraphModule(root, graph)
    gm.meta.update(state["meta"])
    return gm


def _unref(obj, env):
    if isinstance(obj, _Ref):
        return env[obj.name]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_unref(o, env) for o in obj)
    if isinstance(obj, list):
        return [_unref(o, env) for o in obj]
    if isinstance(obj, dict):
        return {k: _unref(v, env) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_unref(obj.start, env), _unref(obj.stop, env), _unref(obj.step, env))
    return obj


def state_of(cm) -> dict:
    """Everything a CompressedModel file holds, as one picklable dict (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    graph = _graph_state(cm.graph_module, tensors)
    memo: dict[int, Any] = {}  # one stored object per tensor: tied parameters stay tied
    stored = {k: memo.setdefault(id(t), _stored(t)) for k, t in tensors.items()}
    import torch.utils._pytree as pytree
    examples = pytree.tree_map(_own_storage, (tuple(cm.example_inputs), dict(cm.example_kwargs)))
    # the graph and its records are many small objects: one compressed pickle, not a zip
    # entry each (the tensors the graph computes with stay torch.save's own records)
    packed = zlib.compress(pickle.dumps(graph, protocol=4), 6)
    return {"format": FORMAT, "version": VERSION, "torch": torch.__version__,
            "graph": packed, "tensors": stored,
            "recipe": cm.recipe.to_list(), "report": _picklable_report(cm.report),
            "example_inputs": examples[0], "example_kwargs": examples[1]}


def _picklable_report(report):
    """The report as it is; a section or stat that does not pickle is kept as its repr."""
    import copy
    if _picklable(report):
        return report
    out = copy.copy(report)
    out.sections = {k: (v if _picklable(v) else repr(v)) for k, v in report.sections.items()}
    out.passes = [copy.copy(r) for r in report.passes]
    for r in out.passes:
        r.stats = {k: (v if _picklable(v) else repr(v)) for k, v in r.stats.items()}
    return out


def from_state(state: dict):
    """A CompressedModel from `state_of`'s dict (shapes re-propagated from the example inputs)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
    from .api import CompressedModel, flat_example_inputs
    from .frontends.common import use_signature_check
    from .passes.analysis.shape_prop import propagate_shapes
    from .recipe import Recipe
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError("not an fxpress CompressedModel state", input_name="path")
    if state["version"] > VERSION:
        raise InputError(f"this CompressedModel file is format version {state['version']}; this "
                         f"fxpress reads up to {VERSION}: upgrade fxpress", input_name="path")
    tensors = {k: (v.unpack() if isinstance(v, (_Packed4, _Fill)) else v)
               for k, v in state["tensors"].items()}
    gm = _build_graph_module(pickle.loads(zlib.decompress(state["graph"])), tensors)
    use_signature_check(gm)
    args, kwargs = state["example_inputs"], state["example_kwargs"]
    propagate_shapes(gm, flat_example_inputs(gm, args, kwargs))
    return CompressedModel(gm, state["report"], Recipe.from_list(state["recipe"]), args, kwargs)


# ------------------------------------------------------------------ save / load
def save(cm, path) -> Path:
    """Write `cm` to `path` (one file, atomically: nothing at `path` unless the write finished)."""
    from .utils import atomic_write
    state = state_of(cm)
    with quiet_torch():
        return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load(path, **options: Any):
    """What `path` holds, ready to call: a CompressedModel, or a backend artefact (see above).

    ``options`` go to the runtime where one takes them (``threads=`` for ONNX Runtime).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder", input_name="path")
    if p.is_dir():
        if (p / "genai_config.json").exists():
            from .backends.artefacts import load_genai_folder
            return load_genai_folder(p, **options)
        if (p / "fxpress.json").exists() and (p / "model.onnx").exists():
            from .llm.lowering import load_generic_folder
            return load_generic_folder(p, **options)
        raise InputError(f"{p}: a folder fxpress can load holds genai_config.json (ORT GenAI) or "
                         "fxpress.json + model.onnx (lm.save of another decoder)", input_name="path")
    from .backends import artefacts
    kind = artefacts.kind_of(p)
    if kind == "compressed":
        with quiet_torch():
            state = torch.load(p, weights_only=False, map_location="cpu")
        return from_state(state)
    return artefacts.load(p, kind, **options)
