"""`fxpress inspect`: capture a model and print its IR summary in the user's module names.

    fxpress inspect tests.models:resnet18 --input-shape 1,3,224,224
    fxpress inspect tests.models:bert --input-shape 2,16:long --input-shape 2,16:long
    fxpress inspect mypkg.nets:build --recipe recipe.yaml --backend onnxruntime --compare

MODEL is ``package.module:factory`` or ``path/to/file.py:factory``; the factory takes no
arguments and returns the model, or ``(model, example_inputs)``. Without example inputs,
give one ``--input-shape`` per input (``1,3,224,224``; append ``:long`` for token ids).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import InputError, RecipeError

__all__ = ["main", "summary", "load_factory", "parse_input_shape"]

_DTYPES = {"float": torch.float32, "float32": torch.float32, "half": torch.float16,
           "bfloat16": torch.bfloat16, "long": torch.long, "int64": torch.long, "int": torch.int32,
           "int32": torch.int32, "bool": torch.bool}


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def parse_input_shape(text: str) -> torch.Tensor:
    """'1,3,224,224' -> randn of that shape; '2,16:long' -> token ids (0..99) of that shape."""
    shape_s, _, dtype_s = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_s.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected comma-separated ints like 1,3,224,224") from None
    dtype = _DTYPES.get(dtype_s or "float")
    if dtype is None or not shape:
        raise InputError(f"--input-shape {text!r}: dtype must be one of {', '.join(_DTYPES)}")
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randint(0, 100, shape, generator=g, dtype=dtype)


def load_factory(spec: str):
    """Resolve 'pkg.mod:factory' or 'file.py:factory' to the callable."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise InputError(f"model {spec!r}: expected package.module:factory or path/file.py:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"model {spec!r}: no file {path}")
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(mspec)
        sys.modules[path.stem] = mod
        mspec.loader.exec_module(mod)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # `fxpress inspect mypkg.mod:f` from a project root
        try:
            mod = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise InputError(f"model {spec!r}: cannot import {target!r} ({e})") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        public = sorted(n for n in vars(mod) if callable(vars(mod)[n]) and not n.startswith("_"))
        raise InputError(f"model {spec!r}: {target} has no {attr!r}; callables there: "
                         f"{', '.join(public[:20])}")
    return fn


def model_and_inputs(spec: str, shapes: list[str]) -> tuple[torch.nn.Module, tuple | dict]:
    """(model, example inputs) from a factory returning the model, ``(model, inputs)`` or
    ``(model, dict)`` (Hugging Face's ``model(**enc)`` style: the dict stays keyword inputs)."""
    made = load_factory(spec)()
    inputs: Any = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
        if isinstance(inputs, Mapping) and not shapes:
            return made.eval(), dict(inputs)
    if not isinstance(made, torch.nn.Module):
        raise InputError(f"model {spec!r}: the factory returned a {type(made).__name__}, "
                         "not an nn.Module or (nn.Module, example_inputs)")
    if shapes:
        inputs = tuple(parse_input_shape(s) for s in shapes)
    if inputs is None:
        raise InputError(f"model {spec!r}: the factory returns no example inputs; pass "
                         "--input-shape (e.g. --input-shape 1,3,224,224), once per input")
    return made.eval(), inputs if isinstance(inputs, tuple) else (inputs,)


def call_args(inputs: tuple | dict) -> tuple[tuple, dict]:
    """(args, kwargs) for one call with a factory's example inputs (a dict is keywords)."""
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def summary(gm: fx.GraphModule, *, top: int | None = 20) -> str:
    """Ops, totals and a per-module MACs/params table for an IR (shapes must be recorded)."""
    from ..ir.meta import lineage
    from ..passes.analysis.cost import cost_by_module, total_cost

    ops = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    ins = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lines = ["inputs: " + ", ".join(
        f"{n.name} {list(n.meta['val'].shape)} {str(n.meta['val'].dtype).replace('torch.', '')}"
        if isinstance(n.meta.get("val"), torch.Tensor) else n.name for n in ins)]
    lines.append(f"IR: {len(gm.graph.nodes)} nodes, {sum(ops.values())} ops of {len(ops)} kinds")
    w = max([len(k) for k in ops] + [2])
    lines += [f"  {k:<{w}}  {v}" for k, v in ops.most_common()]
    tot = total_cost(gm)
    lines.append(f"total: MACs {_fmt(tot.macs)}  params {_fmt(tot.params)}  "
                 f"weights {tot.bytes / 1024:.1f} KB")
    types = {}
    for n in gm.graph.nodes:
        lin = lineage(n)
        if lin and lin.module_path and lin.module_type and n.op == "call_function":
            types.setdefault(lin.module_path, lin.module_type)
    # modules that compute or hold something (top-level functional ops only move bytes)
    per = sorted(((m, c) for m, c in cost_by_module(gm).items() if c.macs or c.params),
                 key=lambda kv: (-kv[1].macs, -kv[1].params, kv[0]))
    shown = per if top is None else per[:top]
    mw = max([len(m) for m, _ in shown] + [6])
    lines.append(f"per module ({'all' if top is None or len(per) <= top else f'top {top} of {len(per)}'}"
                 ", by MACs):")
    lines.append(f"  {'module':<{mw}}  {'type':<18} {'MACs':>9} {'params':>9} {'% MACs':>7}")
    for m, c in shown:
        share = 100.0 * c.macs / tot.macs if tot.macs else 0.0
        lines.append(f"  {m or '<top>':<{mw}}  {types.get(m, ''):<18} {_fmt(c.macs):>9} "
                     f"{_fmt(c.params):>9} {share:>6.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxpress inspect", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="package.module:factory or path/file.py:factory")
    p.add_argument("--input-shape", action="append", default=[], metavar="SHAPE[:DTYPE]",
                   help="one per model input, e.g. 1,3,224,224 or 2,16:long")
    p.add_argument("--frontend", default="export", choices=["export", "fx"])
    p.add_argument("--recipe", help="YAML recipe: inspect the compressed IR instead")
    p.add_argument("--calib", help="calibration batches for --recipe (package.module:function, "
                                   "file.py:function or batches.pt); a recipe that calibrates "
                                   "without it is a CalibrationError, as in the Python API")
    p.add_argument("--backend", help="also print what lowers to int8 kernels on this backend "
                                     "(onnxruntime, inductor)")
    p.add_argument("--compare", action="store_true",
                   help="with --recipe: per-node SQNR of the compressed IR against fp32")
    p.add_argument("--graph", action="store_true", help="also print the whole IR")
    p.add_argument("--top", type=int, default=20, help="modules in the table (0: all)")
    a = p.parse_args(argv)

    import fxpress
    from ..ir.printer import format_graph
    from ..passes.analysis.shape_prop import propagate_shapes

    from ..api import flat_example_inputs
    model, inputs = model_and_inputs(a.model, a.input_shape)
    ref = fxpress.capture(model, inputs, frontend=a.frontend)
    if isinstance(inputs, dict):  # what lowerability / compare call the IR with: its flat inputs
        flat_inputs = tuple(flat_example_inputs(ref, (), inputs))
    else:
        flat_inputs = inputs
    gm, report = ref, None
    if a.recipe:
        from .compress import load_calibration
        cm = fxpress.compress(model, inputs, a.recipe, calibration=load_calibration(a.calib),
                              frontend=a.frontend)
        gm, report = cm.graph_module, cm.report
        propagate_shapes(gm, flat_example_inputs(gm, *call_args(inputs)))
    print(f"model: {a.model} ({type(model).__name__}, frontend={a.frontend}"
          f"{', recipe=' + a.recipe if a.recipe else ''})")
    print(summary(gm, top=a.top or None))
    if report is not None:
        print("\npasses:\n" + str(report))
    if a.backend:
        try:
            from ..backends.lowerability import inspect_text
        except ImportError as e:
            print(f"\n(--backend needs fxpress.backends.lowerability: {e})", file=sys.stderr)
            return 2
        if a.backend not in ("onnxruntime", "inductor"):
            raise RecipeError("unknown backend for inspect", field="backend", value=a.backend,
                              accepted=["onnxruntime", "inductor"])
        print("\n" + inspect_text(gm, a.backend, reference=ref if a.compare else None,
                                  inputs=flat_inputs if a.compare else None,
                                  example_inputs=flat_inputs))
    elif a.compare and not a.recipe:
        print("\n(--compare needs --recipe: there is nothing to compare the fp32 IR with)")
    elif a.compare:
        from ..backends.compare import compare, format_compare
        print("\n" + format_compare(compare(ref, gm, flat_inputs), 10))
    if a.graph:
        print("\n" + format_graph(gm))
    return 0
