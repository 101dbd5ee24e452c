"""The torch.compile entry: a Dynamo graph (torch-level fx) -> the fxpress IR.

torch.compile hands a backend ``(gm, example_inputs)``: the flattened user inputs and
the module's parameters and buffers, lifted to graph inputs. Compression passes need
parameters as named attributes (``conv1.weight``), so lifted ones become attributes
again under the user's names, and the graph is re-exported to the same ATen training IR
`capture` produces. ``ir.meta["dynamo_user_inputs"]`` lists which of the backend's
inputs the IR still takes; ``call_with_dynamo_inputs`` makes a callable of the
backend's signature.

    def my_backend(gm, example_inputs):
        ir = from_dynamo_graph(gm, example_inputs)
        return call_with_dynamo_inputs(ir, ir)
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from ..errors import CaptureError
from .common import finish_ir

__all__ = ["from_dynamo_graph", "rebuild_dynamo_graph", "export_rebuilt", "call_with_dynamo_inputs"]

_PART = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]")


def _attr_path(node: fx.Node) -> str | None:
    """'conv1.weight' for a placeholder Dynamo lifted from a module parameter or buffer."""
    arg = node.meta.get("grapharg")
    source = getattr(getattr(arg, "source", None), "name", None)
    source = source() if callable(source) else source
    # L['self'] when a method was compiled, L['fn'] when torch.compile(module) wrapped the module,
    # L['s'] (any name) when the module's forward calls its first argument something else
    if not isinstance(source, str) or not re.match(r"L\['[A-Za-z_]\w*'\]\._", source):
        return None
    parts = _PART.findall(source)
    if not parts or parts[-1][0] not in ("parameters", "buffers"):
        return None
    return ".".join(name for _, name in parts)


def _set_path(root: torch.nn.Module, path: str, value: torch.Tensor) -> None:
    *mods, attr = path.split(".")
    mod = root
    for m in mods:
        if not hasattr(mod, m):
            mod.add_module(m, torch.nn.Module())
        mod = getattr(mod, m)
    if isinstance(value, torch.nn.Parameter):
        mod.register_parameter(attr, value)
    else:
        mod.register_buffer(attr, value)


def _normalise_module_stack(gm: fx.GraphModule) -> None:
    """Dynamo names modules L['self'].layer1._modules['0'] / L['self'].conv1: make them user paths."""
    for n in gm.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if not stack:
            continue
        fixed = {}
        for key, (path, mtype) in stack.items():
            p = re.sub(r"\._modules\['([^']+)'\]", r".\1", str(path))
            p = re.sub(r"\['([^']+)'\]", r".\1", p)
            p = re.sub(r"^L\.self\.?|^L__self__\.?", "", p)
            fixed[key] = (p, mtype)
        n.meta["nn_module_stack"] = fixed


def from_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """Convert the graph a torch.compile backend receives into the fxpress IR.

    Call it from the backend (it reads graph metadata Dynamo drops afterwards); the
    torch.compile hook splits it: `rebuild_dynamo_graph` at compile time, `export_rebuilt` at
    the first call (so graphs never called are never exported).
    """
    return export_rebuilt(rebuild_dynamo_graph(gm, example_inputs))


def rebuild_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple:
    """The graph with lifted parameters as named attributes again and Dynamo's size inputs read
    off the tensors; returns what `export_rebuilt` needs. Reads graph metadata Dynamo drops
    once the backend returns: call it from the backend."""
    from torch._subclasses.fake_tensor import FakeTensor

    inputs = list(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise CaptureError(f"Dynamo graph has {len(placeholders)} inputs but {len(inputs)} example "
                           "inputs were given", frontend="dynamo")
    # Dynamo hands real tensors to a plain backend; aot/compiled-autograd callers hand fakes
    fake = any(isinstance(x, FakeTensor) for x in inputs)
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    user_inputs, user_examples, sizes, dyn = [], [], [], []
    for i, (n, x) in enumerate(zip(placeholders, inputs, strict=True)):
        if isinstance(x, torch.SymInt) or isinstance(n.meta.get("example_value"), torch.SymInt):
            # a size Dynamo made an input (its dynamic recompile): read off a tensor input
            sizes.append((n, x))
            continue
        path = _attr_path(n) if isinstance(x, torch.Tensor) and not fake else None
        if path is not None:  # a lifted parameter/buffer: an attribute again, under its user name
            _set_path(root, path, x)
            env[n] = graph.get_attr(path)
        else:
            env[n] = graph.placeholder(n.name)
            user_inputs.append(i)
            user_examples.append(torch.zeros(x.shape, dtype=x.dtype) if fake and isinstance(x, torch.Tensor)
                                 else x.detach().clone() if isinstance(x, torch.Tensor) else x)
            dyn.append(_symbolic_dims(n))
        env[n].meta = dict(n.meta)
    for n, x in sizes:  # read each size off the tensor input that carries it
        env[n] = _size_of(graph, env, placeholders, n, x)
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    for name, mod in gm.named_children():  # call_module targets Dynamo kept
        root.add_module(name, mod)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not hasattr(root, str(n.target).split(".")[0]):
            obj = gm
            for p in str(n.target).split("."):
                obj = getattr(obj, p)
            _set_path(root, str(n.target), obj)
    rebuilt = fx.GraphModule(root, graph)
    _normalise_module_stack(rebuilt)
    return rebuilt, tuple(user_examples), dyn, tuple(user_inputs)


def export_rebuilt(state: tuple) -> fx.GraphModule:
    """torch.export the rebuilt graph to the IR: the dims Dynamo made symbolic stay dynamic; a
    first (static) Dynamo graph gets capture's default, a dynamic batch where export allows it
    (so calibration batches of any size fit)."""
    from ..passes.analysis.shape_prop import propagate_shapes
    from .export import _capture_export
    rebuilt, user_examples, dyn, user_inputs = state
    dynamic = tuple({d: torch.export.Dim.AUTO for d in dims} or None for dims in dyn) \
        if any(dyn) else None
    # outside Dynamo's tracing context: an export with dynamic dims inside a backend's compile
    # otherwise adds its guards to the frame Dynamo is compiling (which then fail at once)
    with torch._guards.tracing(None):
        ir = finish_ir(_capture_export(rebuilt, user_examples, None, dynamic, False, "export"))
    propagate_shapes(ir, user_examples)
    ir.meta["dynamo_user_inputs"] = tuple(user_inputs)
    return ir


def _symbolic_dims(n: fx.Node) -> list[int]:
    v = n.meta.get("example_value")
    if not isinstance(v, torch.Tensor):
        return []
    return [d for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt) and not s.node.expr.is_number]


def _size_of(graph: fx.Graph, env: dict, placeholders: list, n: fx.Node, x: torch.SymInt) -> fx.Node:
    """`aten.sym_size.int(t, d)` for the first tensor placeholder `t` whose dim `d` is the symbol `x`."""
    want = str(n.meta["example_value"].node.expr if isinstance(n.meta.get("example_value"), torch.SymInt)
               else x.node.expr)
    for p in placeholders:
        v = p.meta.get("example_value")
        if p in env and isinstance(v, torch.Tensor) and env[p].op == "placeholder":
            for d, s in enumerate(v.shape):
                if isinstance(s, torch.SymInt) and str(s.node.expr) == want:
                    with graph.inserting_after(env[p]):
                        node = graph.call_function(torch.ops.aten.sym_size.int, (env[p], d))
                    node.meta = dict(n.meta)
                    return node
    raise CaptureError(f"Dynamo passed the size {n.name} ({want}) as an input, and no tensor input "
                       "has that size; compile with dynamic=False", frontend="dynamo")


def call_with_dynamo_inputs(ir: fx.GraphModule, fn: Callable) -> Callable:
    """Wrap `fn` (the IR or what a backend made of it) to take all of Dynamo's inputs."""
    keep = ir.meta.get("dynamo_user_inputs")

    def run(*args):
        picked = args if keep is None else [args[i] for i in keep]
        out = fn(*picked)
        return out if isinstance(out, (tuple, list)) else (out,)

    return run
