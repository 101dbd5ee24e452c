"""Backend protocol and registry.

A backend is a callable ``compile(gm, example_inputs, *, device, **options) -> Lowered``.
A `Lowered` takes the same inputs as the user's model and returns torch tensors in the
model's output structure; ``save(path)`` writes the backend's deployable artefact.

Backends are looked up lazily by name so ``import fxpress`` never imports TVM or ORT:

    register_backend("mybackend", "mypkg.mod:compile_fn")
    run = fxpress.lower(cm, backend="mybackend", example_inputs=(x,))
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import RecipeError

__all__ = ["Backend", "Lowered", "register_backend", "get_backend", "available_backends",
           "flatten_inputs", "unflatten_outputs", "flat_graph"]


class Backend(Protocol):
    def __call__(self, gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                 **options: Any) -> "Lowered": ...


class Lowered:
    """A runnable artefact. Subclasses implement `run_flat` (flat tensors in, flat out)."""

    backend: str = ""

    def __init__(self, gm: fx.GraphModule):
        from ..ir.signature import signature
        self._in_spec, self._out_spec = _specs(gm)
        self.signature = signature(gm).with_index_ranges(gm)  # token ids checked per call
        self.report: dict[str, Any] = {}

    def run_flat(self, flat_inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def flatten(self, args: tuple, kwargs: dict) -> list:
        """The call's flat inputs, checked against the IR's signature (InputError names the input)."""
        from ..ir.signature import flatten_call
        return flatten_call(self._in_spec, args, kwargs, self.signature,
                            where=f"the {self.backend or 'lowered'} model")

    def __call__(self, *args, **kwargs):
        return unflatten_outputs(self._out_spec, list(self.run_flat(self.flatten(args, kwargs))))

    def summary(self) -> str:
        """Print (and return) the compressed model's summary, the lowering check and latency."""
        from .check import lowered_summary
        text = lowered_summary(self)
        print(text)
        return text

    def save(self, path) -> Any:
        raise NotImplementedError(f"backend {self.backend!r} has no deployable artefact format")


def flat_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` taking its flat placeholders and returning a tuple of its flat outputs
    (no pytree codegen, no input hooks): what backends compile; `Lowered.__call__` checks and
    flattens calls to it and rebuilds the model's output structure."""
    import copy
    flat = copy.deepcopy(gm)
    flat.graph.set_codegen(fx.graph.CodeGen())
    flat._forward_pre_hooks.clear()
    out = flat.graph.output_node()
    leaves = pytree.tree_leaves(out.args[0])
    out.args = (tuple(leaves),)
    flat.recompile()
    return flat


def _specs(gm: fx.GraphModule):
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return None, None
    return info.in_spec, info.out_spec


def flatten_inputs(in_spec, args: tuple, kwargs: dict) -> list:
    """Flat inputs by the IR's pytree spec, unchecked (see Lowered.flatten for the checked form)."""
    from ..ir.signature import flatten_call
    return flatten_call(in_spec, args, kwargs)


def unflatten_outputs(out_spec, flat: list):
    if out_spec is None:
        return flat[0] if len(flat) == 1 else tuple(flat)
    return pytree.tree_unflatten(flat, out_spec)


_REGISTRY: dict[str, str | Callable] = {
    "eager": "fxpress.backends.eager:compile_eager",
    "inductor": "fxpress.backends.inductor:compile_inductor",
    "onnxruntime": "fxpress.backends.onnxruntime:compile_onnxruntime",
    "tvm": "fxpress.backends.tvm:compile_tvm",
}


def register_backend(name: str, fn: str | Callable) -> None:
    """Register `fn` (a callable or "module:function") under `name`."""
    _REGISTRY[name] = fn


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise RecipeError("unknown backend", field="backend", value=name, accepted=available_backends())
    fn = _REGISTRY[name]
    if isinstance(fn, str):
        mod, attr = fn.split(":")
        fn = getattr(importlib.import_module(mod), attr)
        _REGISTRY[name] = fn
    return fn
