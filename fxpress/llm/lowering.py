"""lower() of a KV-explicit causal-LM IR: a checked callable that is also a `Generator`.

`fxpress.lower(cm, backend)` sends a causal-LM IR here. A backend with its own generator
(``onnxruntime`` -> fxpress.llm.ort, ``inductor`` -> fxpress.llm.inductor once it exists) is
looked up in `GENERATOR_BACKENDS`; any other backend lowers the IR as usual and is wrapped in
`LoweredCausalLM`: calls are completed like the IR's (``run(ids)`` works), and `generate`
runs the lowered graph with the past it returned (a growing cache, concatenated by the graph).

    register_generator_backend("mybackend", "mypkg.mod:lower_lm")   # fn(gm, flat_examples, **options)
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.fx as fx

from ..backends.base import Lowered, get_backend
from .capture import causal_lm_spec, complete_call
from .generate import KVCallGenerator

__all__ = ["GENERATOR_BACKENDS", "LoweredCausalLM", "lower_causal_lm", "register_generator_backend"]

GENERATOR_BACKENDS: dict[str, str | Callable] = {
    "onnxruntime": "fxpress.llm.ort:lower_onnxruntime",
    "inductor": "fxpress.llm.inductor:lower_inductor",
}


def register_generator_backend(name: str, fn: str | Callable) -> None:
    """`fn(gm, flat_example_inputs, *, device, **options)` -> a Lowered that is a Generator."""
    GENERATOR_BACKENDS[name] = fn


def _generator_backend(name: str) -> Callable | None:
    fn = GENERATOR_BACKENDS.get(name)
    if isinstance(fn, str):
        mod, attr = fn.split(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):  # not written yet: the generic wrapper serves
            return None
        GENERATOR_BACKENDS[name] = fn
    return fn


class LoweredCausalLM(KVCallGenerator):
    """Any backend's Lowered of a causal-LM IR, with completed calls and `generate`."""

    def __init__(self, lowered: Lowered, gm: fx.GraphModule):
        self.lowered = lowered
        self._gm_meta = {"fxpress.causal_lm": causal_lm_spec(gm)}
        super().__init__(self._kv_call, causal_lm_spec(gm))

    @property
    def meta(self):  # complete_call reads the spec from here
        return self._gm_meta

    @property
    def report(self):
        return self.lowered.report

    @property
    def backend(self):
        return self.lowered.backend

    def __getattr__(self, name):  # the wrapped Lowered's attributes (onnx_model, save, ...)
        if name.startswith("__") or name == "lowered":
            raise AttributeError(name)
        return getattr(self.lowered, name)

    def __call__(self, *args, **kwargs):
        args, kwargs = complete_call(self, args, kwargs)
        return self.lowered(*args, **kwargs)

    def _kv_call(self, ids, mask, pos, past):
        out = self.lowered(ids, mask, pos, past)
        return out.logits, out.cache


def lower_causal_lm(gm: fx.GraphModule, backend: str, example_inputs: tuple, example_kwargs: dict,
                    *, device: str = "cpu", **options: Any):
    """The causal-LM half of `fxpress.lower` (see the module docstring)."""
    from ..api import flat_example_inputs
    from .capture import ensure_complete_hook
    ensure_complete_hook(gm)
    args, kwargs = complete_call(gm, tuple(example_inputs), dict(example_kwargs or {}))
    flat = flat_example_inputs(gm, args, kwargs)
    fn = _generator_backend(backend)
    if fn is not None:
        return fn(gm, flat, device=device, **options)
    return LoweredCausalLM(get_backend(backend)(gm, flat, device=device, **options), gm)
