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
import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from ..backends.artefacts import LoadedArtefact
from ..backends.base import Lowered, get_backend
from ..errors import InputError
from .capture import causal_lm_spec, complete_call, positions_from_mask
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

    def __init__(self, lowered: Lowered, gm: fx.GraphModule | None = None, spec=None):
        self.lowered = lowered
        spec = spec if gm is None else causal_lm_spec(gm)
        self._gm_meta = {"fxpress.causal_lm": spec}
        super().__init__(self._kv_call, spec)

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
        if isinstance(self.lowered, LoadedArtefact):  # a reloaded .onnx: flat in and out
            flat = self.lowered.run_flat([ids, mask, pos, *(t for kv in past for t in kv)])
            return flat[0], tuple((flat[1 + 2 * i], flat[2 + 2 * i])
                                  for i in range(self.spec.num_layers))
        out = self.lowered(ids, mask, pos, past)
        return out.logits, out.cache

    def save(self, path, tokenizer=None) -> Path:
        """A folder: ``model.onnx`` (this generic export, KV-explicit), ``fxpress.json`` (the
        spec `fxpress.load` reads) and the tokenizer's files when given one. Not an ORT GenAI
        folder: GenAI's own decoders are the Llama / Mistral / Qwen2 ones (`OrtCausalLM`)."""
        if self.lowered.backend != "onnxruntime":
            return super().save(path, tokenizer)
        from ..utils import atomic_folder
        from .ort import spec_json

        def fill(tmp: Path) -> None:
            self.lowered.save(tmp / "model.onnx")
            (tmp / "fxpress.json").write_text(json.dumps(
                {"causal_lm": spec_json(self.spec), "format": GENERIC}, indent=1))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return atomic_folder(path, fill)


GENERIC = "fxpress generic KV decoder (onnx)"


def load_generic_folder(path, **options) -> LoweredCausalLM:
    """A folder `LoweredCausalLM.save` wrote, as a LoweredCausalLM over an ORT session."""
    from ..backends.artefacts import load as load_artefact
    from .ort import spec_from_json
    p = Path(path)
    meta = json.loads((p / "fxpress.json").read_text())
    if meta.get("format") != GENERIC or not (p / "model.onnx").is_file():
        raise InputError(f"{p}: not a folder of fxpress's generic KV decoder", input_name="path")
    return LoweredCausalLM(load_artefact(p / "model.onnx", "onnx", **options),
                           spec=spec_from_json(meta["causal_lm"]))


def _with_past(gm, args: tuple, kwargs: dict) -> tuple:
    """`args` (ids, mask, positions, past) with a past of >= 2 tokens: an exporter re-tracing the
    IR on an empty past would see the mask length equal the token count (Bloom's alibi then fails
    to stay dynamic); the past's length differs from the batch and token counts."""
    if kwargs or len(args) != 4 or not args[3] or args[3][0][0].shape[2] >= 2:
        return args
    ids = args[0]
    b, t = ids.shape
    p = next(n for n in range(3, 64) if n not in (b, t))
    spec = causal_lm_spec(gm)
    gen = torch.Generator().manual_seed(0)
    past = tuple(tuple(torch.randn(b, spec.kv_heads, p, spec.head_dim, generator=gen) for _ in range(2))
                 for _ in range(spec.num_layers))
    mask = torch.ones(b, p + t, dtype=torch.long)
    return ids, mask, positions_from_mask(mask, t), past


def lower_causal_lm(gm: fx.GraphModule, backend: str, example_inputs: tuple, example_kwargs: dict,
                    *, device: str = "cpu", **options: Any):
    """The causal-LM half of `fxpress.lower` (see the module docstring)."""
    from ..api import flat_example_inputs
    from .capture import ensure_complete_hook
    ensure_complete_hook(gm)
    args, kwargs = complete_call(gm, tuple(example_inputs), dict(example_kwargs or {}))
    flat = flat_example_inputs(gm, _with_past(gm, args, kwargs), kwargs)
    fn = _generator_backend(backend)
    if fn is not None:
        return fn(gm, flat, device=device, **options)
    return LoweredCausalLM(get_backend(backend)(gm, flat, device=device, **options), gm)
