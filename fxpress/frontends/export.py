"""capture(): the model -> IR frontend (torch.export; torch.fx.symbolic_trace as fallback).

    gm = fxpress.capture(model, (torch.randn(1, 3, 224, 224),))
    print(fxpress.ir.format_graph(gm))
"""
from __future__ import annotations

import inspect
import re
import traceback
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
        sig = inspect.signature(model.forward)
        sig.bind(*example_inputs, **example_kwargs)
    except TypeError as e:
        names = list(inspect.signature(model.forward).parameters)
        raise InputError(f"example inputs do not match {type(model).__name__}.forward{tuple(names)}: "
                         f"got {len(example_inputs)} positional input(s) "
                         f"({', '.join(_describe(x) for x in example_inputs)}): {e}") from e
    except ValueError:
        pass  # builtins without a signature: let the call below decide
    try:
        with torch.no_grad():
            model(*example_inputs, **example_kwargs)
    except Exception as e:
        names = list(inspect.signature(model.forward).parameters)
        where = _failing_module(model, e)
        described = ", ".join(f"{i} ({names[i] if i < len(names) else '?'}: {_describe(x)})"
                              for i, x in enumerate(example_inputs))
        first = _first_tensor_index(model, e, example_inputs)
        msg = (f"example inputs do not fit {type(model).__name__}: {type(e).__name__}: "
               f"{str(e).splitlines()[0] if str(e) else ''}\n  inputs: {described}")
        if where:
            msg += f"\n  failed in module {where!r}"
        raise InputError(msg, index=first, input_name=names[first] if first is not None and first < len(names) else None) from e


def _failing_module(model: torch.nn.Module, exc: BaseException) -> str | None:
    """The innermost user submodule whose forward was on the stack when `exc` was raised."""
    by_id = {id(m): name for name, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        obj = frame.f_locals.get("self")
        if obj is not None and id(obj) in by_id:
            found = by_id[id(obj)] or type(model).__name__
    return found


def _first_tensor_index(model, exc, inputs) -> int | None:
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            return i
    return None


def capture(model: torch.nn.Module, example_inputs: Any, *, example_kwargs: dict | None = None,
            dynamic_shapes: Any = None, frontend: str = "export", check: bool = True) -> fx.GraphModule:
    """Capture `model` into the fxpress IR: an ATen-level fx.GraphModule with Lineage records.

    frontend="export" uses torch.export (training IR: aten.conv2d, aten.linear, ...);
    frontend="fx" uses torch.fx.symbolic_trace and then decomposes to the same ATen ops.
    The IR owns copies of the parameters: passes never touch the user's model.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture() needs an nn.Module, got {type(model).__name__}", frontend="none")
    example_inputs = as_input_tuple(example_inputs)
    if check:
        check_inputs(model, example_inputs, example_kwargs)
    if frontend == "export":
        gm = _capture_export(model, example_inputs, example_kwargs, dynamic_shapes)
    elif frontend == "fx":
        gm = _capture_fx(model, example_inputs)
    else:
        from ..errors import RecipeError
        raise RecipeError("unknown frontend", field="frontend", value=frontend, accepted=["export", "fx"])
    return finish_ir(gm)


def _capture_export(model, example_inputs, example_kwargs, dynamic_shapes) -> fx.GraphModule:
    try:
        ep = torch.export.export(model, example_inputs, kwargs=example_kwargs,
                                 dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch raises many types here; translate them to one that explains
        raise _capture_error(e, "export") from e
    return ep.module()


_OP_PATTERNS = [
    re.compile(r"(?:call_function|function|op|operator)[: ]+<?([\w.:]+)"),
    re.compile(r"(aten::?\.?[\w.]+)"),
    re.compile(r"Could not guard on data-dependent expression ([^\s(]+)"),
]


def _capture_error(e: BaseException, frontend: str) -> CaptureError:
    text = str(e)
    frames = re.findall(r'File "([^"]+)", line (\d+)', text)
    tb_frames = [(f.f_code.co_filename, str(line)) for f, line in traceback.walk_tb(e.__traceback__)]
    user = [f for f in frames + tb_frames if "/torch/" not in f[0] and "/fxpress/" not in f[0]]
    source = f"{user[-1][0]}:{user[-1][1]}" if user else source_of(text)
    op = None
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            op = m.group(1)
            break
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return CaptureError(f"torch.{frontend} could not capture the model: {type(e).__name__}: {first}",
                        op=op, source=source, frontend=frontend)


def _capture_fx(model, example_inputs) -> fx.GraphModule:
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:
        err = _capture_error(e, "fx")
        raise CaptureError(str(err).split("\n")[0], op=err.op, source=err.source, frontend="fx") from e
    # Decompose the module-level graph to the same ATen training IR as export, keeping
    # module paths: export the traced module (it is plain Python with no control flow left).
    try:
        ep = torch.export.export(traced, example_inputs, strict=False)
    except Exception as e:
        raise _capture_error(e, "fx") from e
    gm = ep.module()
    return gm
