"""The torch.compile entry point: ``torch.compile(model, backend="fxpress", options={...})``.

    compiled = torch.compile(model, backend="fxpress", options={
        "recipe": [fxpress.Quantize(mode="static")],   # anything Recipe.coerce accepts
        "lower_to": "onnxruntime",                     # inductor | onnxruntime | eager
        "calibration": batches,                        # optional: user-level input tuples
        "observe_calls": 8,                            # without calibration: calls observed first
    })

Dynamo hands us each captured graph; `fxpress.frontends.from_dynamo_graph` turns it into the IR.
A recipe that needs calibration data and got none observes the first `observe_calls` real
calls (running the graph eagerly and keeping their inputs), then compresses with those as the
calibration set, lowers, and swaps the lowered artefact in for every later call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..errors import RecipeError
from ..recipe import Recipe, check_choice, check_range

__all__ = ["fxpress_backend", "HookOptions"]


@dataclass(frozen=True)
class HookOptions:
    recipe: Any = None
    lower_to: str = "inductor"
    calibration: Any = None
    observe_calls: int = 8
    backend_options: Any = None  # extra keyword options for the backend (dict)

    def __post_init__(self):
        check_choice("lower_to", self.lower_to, ["inductor", "onnxruntime", "eager", "tvm"])
        check_range("observe_calls", self.observe_calls, 1, None)

    @classmethod
    def from_dict(cls, options: dict | None) -> "HookOptions":
        options = dict(options or {})
        known = set(cls.__dataclass_fields__)
        for k in options:
            if k not in known:
                raise RecipeError("unknown torch.compile option for backend 'fxpress'", field=k,
                                  value=options[k], accepted=sorted(known))
        return cls(**options)


def _needs_calibration(recipe: Recipe) -> bool:
    for entry in recipe.entries:
        if getattr(entry, "mode", None) in ("static", "qat") or getattr(entry, "needs_calibration", False):
            return True
    return False


class _Hooked:
    """What torch.compile calls in place of the graph: observes, then runs the lowered artefact."""

    def __init__(self, gm: fx.GraphModule, opts: HookOptions, n_inputs: int):
        self.gm, self.opts, self.n_inputs = gm, opts, n_inputs
        self.recipe = Recipe.coerce(opts.recipe) if opts.recipe is not None else Recipe([])
        self.observed: list[tuple] = []
        self.lowered = None
        self.report: dict[str, Any] = {}

    def _calibration(self, args: Sequence) -> list[tuple] | None:
        if self.opts.calibration is None:
            return None
        # user batches cover the graph's leading user inputs; lifted parameters follow unchanged
        out = []
        for b in self.opts.calibration:
            b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
            out.append(b + tuple(args[len(b):]))
        return out

    @torch._dynamo.disable  # the lowering runs its own compile; keep Dynamo out of it
    def __call__(self, *args):
        if self.lowered is not None:
            return tuple(self.lowered.run_flat(list(args)))
        calibration = self._calibration(args)
        if calibration is None and _needs_calibration(self.recipe):
            self.observed.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                       for a in args))
            if len(self.observed) < self.opts.observe_calls:
                with torch.no_grad():
                    return self.gm(*args)
            calibration = self.observed
        self.lowered = self._build(tuple(args), calibration)
        self.observed = []
        return tuple(self.lowered.run_flat(list(args)))

    def _build(self, args: tuple, calibration):
        from ..frontends import from_dynamo_graph
        from ..passes.base import PassContext
        from ..passes.manager import PassManager
        from .base import get_backend

        ir = from_dynamo_graph(self.gm, args)
        if self.recipe.entries:
            ctx = PassContext(example_inputs=args, calibration=calibration, original=self.gm)
            ir, report = PassManager(self.recipe.passes()).run(ir, ctx)
            self.report["passes"] = report
        options = dict(self.opts.backend_options or {})
        if self.opts.lower_to == "onnxruntime" and calibration is not None:
            options.setdefault("calibration", calibration)
        lowered = get_backend(self.opts.lower_to)(ir, args, device="cpu", **options)
        self.report["lowered"] = lowered.report
        return lowered


def fxpress_backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                    options: dict | None = None, mode: str | None = None):
    """torch.compile backend (entry point group torch_dynamo_backends, name "fxpress")."""
    if mode not in (None, "default"):
        raise RecipeError("backend 'fxpress' takes no mode; use options={'lower_to': ...}",
                          field="mode", value=mode)
    opts = HookOptions.from_dict(options)
    return _Hooked(gm, opts, len(example_inputs))
