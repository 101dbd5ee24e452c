"""compress() and lower(): the two calls most users make.

    cm = fxpress.compress(model, (x,), [fxpress.Quantize(mode="static")], calibration=loader)
    run = fxpress.lower(cm, backend="onnxruntime", example_inputs=(x,))
    y = run(x)
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from .backends.base import Lowered, get_backend
from .frontends.export import capture
from .passes.base import PassContext
from .passes.manager import PassManager, Report
from . import progress
from .recipe import Recipe
from .utils import as_input_tuple, quiet_torch

__all__ = ["CompressedModel", "compress", "lower"]


class CompressedModel(torch.nn.Module):
    """The compressed IR as an nn.Module: call it, fine-tune it, lower it.

    `graph_module` is the IR after the recipe's passes; `report` holds per-pass stats
    and extra sections (sensitivity, lowerability, ...). Its parameters are its own:
    an ordinary torch optimizer can fine-tune them.
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, recipe: Recipe,
                 example_inputs: tuple, example_kwargs: dict | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self.recipe = recipe
        self.example_inputs = example_inputs
        self.example_kwargs = example_kwargs or {}

    def train(self, mode: bool = True) -> "CompressedModel":
        """Set the training flag on this module and every IR submodule, as nn.Module.train does.

        torch.export's modules refuse ``train()``; their ops keep the eval form of batch norm
        and dropout they were captured with, so a user's ordinary ``model.train()`` loop
        fine-tunes the weights with BN statistics frozen. QAT's prepared IR holds real BN and
        dropout modules, which follow the flag.
        """
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for m in self.modules():
            m.training = mode
        return self

    def save(self, path) -> "os.PathLike":
        """Write this model to one file (atomically): the IR with its records, the recipe and the
        report, compressed weights kept compressed. ``fxpress.load(path)`` reads it back in any
        process, with bit-identical outputs (fxpress/saving.py)."""
        from .saving import save
        return save(self, path)

    def __reduce__(self):
        # torch.save(cm) / pickle: the same state as cm.save (the IR's GraphModule class is made
        # at run time and does not pickle itself)
        from .saving import from_state, state_of
        return (from_state, (state_of(self),))

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def summary(self) -> str:
        """Print (and return) size, MACs by dtype and SQNR vs fp32 before/after the recipe."""
        from .coverage import summary_text
        text = summary_text(self)
        print(text)
        return text

    def forward(self, *args, **kwargs):
        from .ir.signature import check_ir_call
        from .llm.capture import complete_call
        gm = self.graph_module
        args, kwargs = complete_call(gm, args, kwargs)  # a causal LM called with input_ids only
        if not any(h is check_ir_call for h in gm._forward_pre_hooks.values()):
            # a pass rebuilt the GraphModule: check (and normalise the call) here instead
            args, kwargs = check_ir_call(gm, args, kwargs) or (args, kwargs)
        return gm(*args, **kwargs)


def compress(model: torch.nn.Module, example_inputs: Any, recipe: Any = None, *,
             calibration: Iterable | None = None, finetune: Callable | None = None,
             example_kwargs: dict | None = None, frontend: str = "export",
             dynamic_shapes: Any = None, static_shapes: bool = False,
             debug: bool = False) -> CompressedModel:
    """Capture `model`, run the recipe's passes, return a CompressedModel.

    The user's model is never modified: capture works on a deep copy in eval mode.
    `calibration` is any iterable of input tuples (or tensors); `finetune(module)` trains
    a module in place where a pass asks for it (iterative pruning, QAT, distillation).
    The batch (leading) dimension of every tensor input is dynamic by default, so the result
    and its lowerings serve any batch size; `dynamic_shapes` (torch.export's format, e.g.
    ``{"input_ids": {0: Dim("batch"), 1: Dim("seq")}}``) says more (or less), and
    ``static_shapes=True`` fixes every size to the example's. Calibration batches may have any
    batch size.
    """
    # torch's own deprecation chatter, scoped to this call (inline, not a decorator: a
    # wrapper frame would shift the stacklevel of the warnings fxpress itself gives)
    with quiet_torch():
        recipe = Recipe.coerce(recipe)
        from .distributed import check_same_recipe
        check_same_recipe(recipe)  # under a process group: every rank's recipe is rank 0's
        # a dict or a tokenizer's BatchEncoding (a Mapping, not a dict)
        if isinstance(example_inputs, Mapping) and example_kwargs is None:  # compress(model, enc)
            example_inputs, example_kwargs = (), dict(example_inputs)
        example_inputs = as_input_tuple(example_inputs)
        # the module tree is copied (capture sets modes and attributes on it) but its parameters
        # are the user's: nothing writes them before capture's finish_ir gives the IR its own
        # (detach_parameters), so the peak is user + IR, not user + copy + IR (a 1B fp32 Llama:
        # 13.6 -> ~9 GiB). Buffers are copied: a forward may update one in place (running
        # statistics, state caches) when a frontend runs the model eagerly
        shared = {id(t): t for t in model.parameters()}
        work = copy.deepcopy(model, shared).eval()
        with progress.step(f"capturing {type(model).__name__}"):
            gm = capture(work, example_inputs, example_kwargs=example_kwargs, frontend=frontend,
                         dynamic_shapes=dynamic_shapes, static_shapes=static_shapes)
        from .llm.capture import complete_call
        example_inputs, example_kwargs = complete_call(gm, example_inputs, example_kwargs or {})
        ctx = PassContext(example_inputs=example_inputs, calibration=calibration, finetune=finetune,
                          original=model, debug=debug)
        from .coverage import after_compress, snapshot
        before = snapshot(gm, example_inputs, example_kwargs)  # fp32 cost, weight shapes, outputs
        gm, report = PassManager(recipe.passes(), debug=debug).run(gm, ctx)
        return after_compress(CompressedModel(gm, report, recipe, example_inputs, example_kwargs), before)


def lower(model: Any, backend: str = "eager", *, example_inputs: Any = None,
          example_kwargs: dict | None = None, device: str = "cpu", **options: Any) -> Lowered:
    """Lower a CompressedModel, an IR GraphModule or a plain nn.Module to `backend`.

    The result takes the model's args and kwargs (checked against the IR's signature: an
    InputError names the input) and returns the model's output structure. Dynamic dims of
    the IR stay dynamic in the artefact.
    """
    with quiet_torch():  # as in compress
        if isinstance(model, CompressedModel):
            gm = model.graph_module
            example_inputs = as_input_tuple(example_inputs) if example_inputs is not None else model.example_inputs
        elif isinstance(model, fx.GraphModule):
            gm = model
            if example_inputs is None:
                from .passes.analysis.shape_prop import placeholder_examples
                example_inputs = tuple(placeholder_examples(gm))
            example_inputs = as_input_tuple(example_inputs)
        elif isinstance(model, torch.nn.Module):
            if example_inputs is None:
                from .errors import InputError
                raise InputError("lower() of a plain nn.Module needs example_inputs to capture it")
            example_inputs = as_input_tuple(example_inputs)
            gm = capture(copy.deepcopy(model).eval(), example_inputs, example_kwargs=example_kwargs)
        else:
            from .errors import RecipeError
            raise RecipeError("lower() takes a CompressedModel, a GraphModule or an nn.Module",
                              field="model", value=type(model).__name__)
        kwargs = model.example_kwargs if isinstance(model, CompressedModel) and example_kwargs is None \
            else (example_kwargs or {})
        from .llm.capture import causal_lm_spec
        if causal_lm_spec(gm) is not None:  # a KV-explicit causal LM: a lowered model that generates
            from .llm.lowering import lower_causal_lm
            return lower_causal_lm(gm, backend, example_inputs, kwargs, device=device, **options)
        from .backends.check import lower_checked  # runs the example through IR and artefact
        with progress.step(f"lowering to {backend}"):
            return lower_checked(model, gm, backend, flat_example_inputs(gm, example_inputs, kwargs),
                                 device=device, **options)


def flat_example_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> tuple:
    """The IR's flat inputs (placeholder order) for one call, as every backend receives them.

    ``model(**enc)``-style models captured with example_kwargs flatten to their placeholders;
    inputs that are already flat (one per placeholder) pass through.
    """
    from .ir.signature import flatten_call
    from .errors import InputError
    from .backends.base import _specs
    in_spec = _specs(gm)[0]
    try:
        return tuple(flatten_call(in_spec, tuple(args), dict(kwargs or {})))
    except InputError:
        n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        if not kwargs and len(args) == n_ph:
            return tuple(args)
        raise
