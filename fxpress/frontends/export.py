"""capture(): the model -> IR frontend (torch.export; torch.fx.symbolic_trace as fallback).

    gm = fxpress.capture(model, (torch.randn(1, 3, 224, 224),))
    print(fxpress.ir.format_graph(gm))
"""
from __future__ import annotations

import inspect
import linecache
import re
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from ..errors import CaptureError, InputError
from ..utils import as_input_tuple
from .common import finish_ir, source_of

__all__ = ["capture", "check_inputs"]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def check_inputs(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> None:
    """Run `model` once on the inputs; on failure raise InputError saying which input and module."""
    example_kwargs = example_kwargs or {}
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # builtins without a signature: let the call below decide
        names = []
    if names:
        try:
            inspect.signature(model.forward).bind(*example_inputs, **example_kwargs)
        except TypeError as e:
            extra = len(example_inputs) if len(example_inputs) > len(names) else None
            raise InputError(f"example inputs do not match {type(model).__name__}.forward"
                             f"({', '.join(names)}): got {len(example_inputs)} positional input(s) "
                             f"({', '.join(_describe(x) for x in example_inputs)}): {e}",
                             index=extra) from e
    try:
        with torch.no_grad():
            model(*example_inputs, **example_kwargs)
    except Exception as e:
        where = _failing_module(model, e)
        reached = _inputs_reaching_failure(model, example_inputs, example_kwargs)
        first = reached[0] if reached else None

        def label(i):
            return f"input {i} ({names[i] + ': ' if i < len(names) else ''}{_describe(example_inputs[i])})"

        msg = f"example inputs do not fit {type(model).__name__}"
        if reached:
            verb = "reaches" if len(reached) == 1 else "reach"
            msg += f": {' and '.join(label(i) for i in reached)} {verb} the failing op"
        if where:
            msg += f" in module {where!r}"
        msg += f"\n  {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        msg += "\n  inputs: " + ", ".join(label(i) for i in range(len(example_inputs)))
        raise InputError(msg, index=first,
                         input_name=names[first] if first is not None and first < len(names) else None) from e


def _failing_module(model: torch.nn.Module, exc: BaseException) -> str | None:
    """The innermost user submodule whose forward was on the stack when `exc` was raised."""
    by_id = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if obj is not None and id(obj) in by_id:
            found = by_id[id(obj)] or type(model).__name__
    return found


class _Provenance(torch.overrides.TorchFunctionMode):
    """Tracks which example inputs every tensor derives from; notes them at the failing call."""

    def __init__(self):
        super().__init__()
        self.origin: dict[int, tuple[torch.Tensor, frozenset]] = {}  # id -> (tensor kept alive, inputs)
        self.failed: frozenset | None = None

    def of(self, x) -> frozenset:
        hit = self.origin.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else frozenset()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        srcs = frozenset().union(*(self.of(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))
                                   if isinstance(t, torch.Tensor)))
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.failed is None:
                self.failed = srcs
            raise
        if srcs:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.origin[id(t)] = (t, srcs | self.of(t))
        return out


def _inputs_reaching_failure(model, inputs: tuple, kwargs: dict) -> list[int]:
    """Indices of the example inputs whose values flow into the op that raised (a diagnostic re-run)."""
    mode = _Provenance()
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            mode.origin[id(x)] = (x, frozenset([i]))
    try:
        with torch.no_grad(), mode:
            model(*inputs, **kwargs)
    except Exception:
        pass
    return sorted(mode.failed) if mode.failed else []


def capture(model: torch.nn.Module, example_inputs: Any, *, example_kwargs: dict | None = None,
            dynamic_shapes: Any = None, static_shapes: bool = False, frontend: str = "export",
            check: bool = True) -> fx.GraphModule:
    """Capture `model` into the fxpress IR: an ATen-level fx.GraphModule with Lineage records.

    frontend="export" uses torch.export (training IR: aten.conv2d, aten.linear, ...);
    frontend="fx" uses torch.fx.symbolic_trace and then decomposes to the same ATen ops.
    The IR owns copies of the parameters: passes never touch the user's model.

    Shapes: the leading (batch) dimension of every tensor input is dynamic by default; where
    export specializes it (the model needs a fixed batch) the IR is static and one warning says
    why. ``dynamic_shapes=`` (torch.export's format) wins over the default, e.g.
    ``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}, ...}``; ``static_shapes=True`` opts out.
    The result's input signature (`fxpress.ir.signature(gm)`) says which dims are dynamic.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture() needs an nn.Module, got {type(model).__name__}", frontend="none")
    # a dict or a tokenizer's BatchEncoding (a Mapping, not a dict)
    if isinstance(example_inputs, Mapping) and example_kwargs is None:  # capture(model, enc)
        example_inputs, example_kwargs = (), dict(example_inputs)
    example_inputs = as_input_tuple(example_inputs)
    if frontend not in ("export", "fx"):
        from ..errors import RecipeError
        raise RecipeError("unknown frontend", field="frontend", value=frontend, accepted=["export", "fx"])
    from ..llm.capture import NoKVCache, capture_causal_lm, wants_kv_capture
    if frontend == "export" and wants_kv_capture(model, example_kwargs, dynamic_shapes):
        try:
            return capture_causal_lm(model, example_inputs, example_kwargs, static_shapes=static_shapes)
        except (NoKVCache, CaptureError) as e:  # the plain forward still compresses and runs
            warnings.warn(f"fxpress.capture: {type(model).__name__} is captured without its KV cache "
                          f"({e}); the IR maps a whole sequence to logits and its lowering has no "
                          "generate(); example_kwargs={'use_cache': False} says this up front",
                          stacklevel=3)
    from .hf import hf_capture_conventions
    with hf_capture_conventions(model, example_kwargs):
        if check:
            check_inputs(model, example_inputs, example_kwargs)
        if frontend == "fx":
            model = _trace_fx(model)
        gm = _capture_export(model, example_inputs, example_kwargs, dynamic_shapes, static_shapes,
                             frontend)
    gm = finish_ir(gm)
    # passes read concrete sizes (the example's); which dims are dynamic is the signature's
    from ..ir.signature import flatten_call
    from ..passes.analysis.shape_prop import propagate_shapes
    info = getattr(gm.graph._codegen, "pytree_info", None)
    propagate_shapes(gm, flatten_call(info.in_spec if info else None, example_inputs, example_kwargs or {}))
    return gm


def _batch_dynamic(model, example_inputs: tuple, example_kwargs: dict | None, dim):
    """torch.export dynamic_shapes marking dim 0 of every tensor input (args and kwargs), keyed
    by forward's parameter names (export's format when keyword inputs are given)."""
    def mark(x):
        if isinstance(x, torch.Tensor):
            return {0: dim} if x.dim() >= 1 else None
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(mark(v) for v in x)
        if isinstance(x, dict):
            return {k: mark(v) for k, v in x.items()}
        return None
    try:
        bound = inspect.signature(model.forward).bind(*example_inputs, **(example_kwargs or {}))
    except (TypeError, ValueError):
        return tuple(mark(x) for x in example_inputs)
    params = inspect.signature(model.forward).parameters
    out = {}
    for name, value in bound.arguments.items():
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: mark(v) for k, v in value.items()}
        else:
            out[name] = mark(value)
    return out


def _export(model, example_inputs, example_kwargs, dynamic_shapes):
    return torch.export.export(model, example_inputs, kwargs=example_kwargs,
                               dynamic_shapes=dynamic_shapes, strict=False)


def _specialized(gm: fx.GraphModule) -> list[str]:
    """Tensor placeholders whose leading dim came out static although it was asked dynamic."""
    out = []
    for n in gm.graph.nodes:
        v = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and not isinstance(v.shape[0], torch.SymInt):
            out.append(n.name)
    return out


def _capture_export(model, example_inputs, example_kwargs, dynamic_shapes, static_shapes,
                    frontend) -> fx.GraphModule:
    from torch.fx.experimental import _config as fx_config

    dynamic_error = None
    if dynamic_shapes is None and not static_shapes:
        # batch dynamic by default. Size-oblivious reasoning keeps a batch-1 example general
        # (export would otherwise specialize a dim whose example size is 1).
        try:
            with fx_config.patch(backed_size_oblivious=True):
                gm = _export(model, example_inputs, example_kwargs,
                             _batch_dynamic(model, example_inputs, example_kwargs, torch.export.Dim.AUTO)).module()
        except Exception as e:  # export failed with a dynamic batch: try static once
            dynamic_error = e
        else:
            fixed = _specialized(gm)
            if fixed:
                _warn_static(model, example_inputs, example_kwargs, fixed)
            return gm
    try:
        gm = _export(model, example_inputs, example_kwargs, dynamic_shapes).module()
    except Exception as e:  # torch raises many types here; translate them to one that explains
        raise _capture_error(e, frontend) from e
    from ..ir.signature import record_dim_names  # the user's Dim("seq") is "seq" in the signature
    record_dim_names(gm, model, example_inputs, example_kwargs, dynamic_shapes)
    if dynamic_error is not None:  # static worked where a dynamic batch did not: say why, once
        warnings.warn(f"fxpress.capture: the batch dimension cannot be dynamic for "
                      f"{type(model).__name__} ({_reason(dynamic_error)}); captured with static "
                      "shapes (static_shapes=True silences this)", stacklevel=3)
    return gm


def _reason(e: BaseException) -> str:
    """The first line of torch's explanation, with the op it names."""
    err = _capture_error(e, "export")
    line = str(err).splitlines()[0].split(": ", 1)[-1]
    where = f" at {err.source}" if err.source else ""
    return (f"{err.op}: " if err.op else "") + line[:300] + where


def _warn_static(model, example_inputs, example_kwargs, fixed: list[str]) -> None:
    """Export specialized the batch of `fixed`: ask again strictly to learn which op did it."""
    from torch.fx.experimental import _config as fx_config
    why = "export specialized it"
    try:
        with fx_config.patch(backed_size_oblivious=True):
            _export(model, example_inputs, example_kwargs,
                    _batch_dynamic(model, example_inputs, example_kwargs, torch.export.Dim.DYNAMIC))
    except Exception as e:
        why = _reason(e)
    warnings.warn(f"fxpress.capture: the batch dimension of {', '.join(fixed)} stays static for "
                  f"{type(model).__name__}: {why}. Pass dynamic_shapes= to say otherwise, or "
                  "static_shapes=True to silence this.", stacklevel=4)


# Where torch's message names the op it refused (checked in order).
_OP_PATTERNS = [
    re.compile(r"(aten::[\w.]+|aten\.[\w.]+)"),
    re.compile(r"(?:call_function|function|operator)[: ]+<?([\w.:]+)"),
    re.compile(r"(\.\w+\(\)) is not supported"),            # ".numpy() is not supported ..."
]
_DATA_DEPENDENT = ("data-dependent", "GuardOnDataDependent", "cannot be used as inputs to control flow",
                   "Proxy")


def _user_frame(e: BaseException) -> tuple[str, int] | None:
    """The innermost frame outside torch and fxpress: where the user's code did the thing."""
    text = str(e)
    frames = [(f, int(n)) for f, n in re.findall(r'File "([^"]+)", line (\d+)', text)]
    tb = [(f.f_code.co_filename, n) for f, n in traceback.walk_tb(e.__traceback__)]
    stack = [(fs.filename, fs.lineno) for fs in getattr(e, "real_stack", None) or []]

    def user(frames):
        return [f for f in frames if "/torch/" not in f[0] and "/fxpress/" not in f[0]
                and not f[0].startswith("<")]

    found = user(frames) or user(stack) or user(tb)
    return found[-1] if found else None


def _failed_op(e: BaseException) -> str | None:
    """The op torch refused or whose value the model branched on, as 'aten.item.default'."""
    partial = getattr(e, "partial_fx_graph", None)
    if partial:  # the graph traced up to the failure: its last op produced the offending value
        ops = re.findall(r"torch\.ops\.([\w.]+)\(", partial)
        if ops:
            return ops[-1]
    for pat in _OP_PATTERNS:
        m = pat.search(str(e))
        if m:
            return m.group(1).replace("::", ".")
    return None


def _capture_error(e: BaseException, frontend: str) -> CaptureError:
    text = str(e)
    frame = _user_frame(e)
    source = None
    if frame:
        code = linecache.getline(frame[0], frame[1]).strip()
        source = f"{frame[0]}:{frame[1]}" + (f": {code}" if code else "")
    else:
        source = source_of(text)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    msg = f"torch.{frontend} could not capture the model: {type(e).__name__}: {first}"
    found = re.search(r"Found <class '([\w.]+)'> in output", text)
    if found:  # an output object export cannot flatten (an HF cache, a custom class)
        cls = found.group(1)
        msg = (f"torch.export could not capture the model: its output holds a {cls.rsplit('.', 1)[-1]} "
               f"({cls}), which torch.export cannot flatten")
        msg += ("\n  fix: pass use_cache=False in example_kwargs (or set model.config.use_cache = False)"
                if "Cache" in cls else
                "\n  fix: return tensors (or tuples/dicts of them), or register the class with "
                "torch.utils._pytree.register_pytree_node")
    if "Suggested fixes:" in text:  # a dynamic_shapes spec export disagrees with: say its fix
        lines = [ln.strip() for ln in text.split("Suggested fixes:", 1)[1].splitlines()]
        fixes = [ln for ln in lines[:8] if ln and not ln.startswith("The error above")]
        violated = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("- ")][:3]
        msg += "".join(f"\n  {v}" for v in violated)
        msg += "\n  suggested dynamic_shapes fix: " + "; ".join(fixes)
    if any(k in text or k in type(e).__name__ for k in _DATA_DEPENDENT):
        msg += ("\n  why: the model turns a tensor value into Python control flow or a Python number "
                "at this line; a captured graph cannot depend on it")
    return CaptureError(msg, op=_failed_op(e), source=source, frontend=frontend)


def _trace_fx(model) -> fx.GraphModule:
    """symbolic_trace; export then decomposes the module-level graph to the same ATen IR,
    keeping module paths (the traced module is plain Python with no control flow left)."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:
        err = _capture_error(e, "fx")
        raise CaptureError(str(err).split("\n")[0], op=err.op, source=err.source, frontend="fx") from e
