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
    """What torch.compile calls in place of the graph: observes, then runs the lowered artefact.

    Dynamo's graph is rebuilt when Dynamo hands it over (lifted parameters are told from
    user inputs by the graph's sources, which Dynamo drops afterwards; the sizes it passes on
    its dynamic recompile become dynamic dims) and exported to the IR at the first call. Calls then pass only the
    user inputs the IR takes.
    """

    def __init__(self, gm: fx.GraphModule, rebuilt: tuple, opts: HookOptions):
        self.gm, self.rebuilt, self.opts = gm, rebuilt, opts
        self.ir: fx.GraphModule | None = None
        self.keep = None
        self.recipe = Recipe.coerce(opts.recipe) if opts.recipe is not None else Recipe([])
        self.observed: list[tuple] = []
        self.lowered = None
        self.lowered_ir: fx.GraphModule | None = None  # the IR after the recipe, once built
        self.report: dict[str, Any] = {}

    def _user(self, args: Sequence) -> tuple:
        return tuple(args) if self.keep is None else tuple(args[i] for i in self.keep)

    def _calibration(self) -> list[tuple] | None:
        if self.opts.calibration is None:
            return None
        # user batches are the model's inputs, exactly the IR's inputs
        return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in self.opts.calibration]

    @torch._dynamo.disable  # the lowering runs its own compile; keep Dynamo out of it
    def __call__(self, *args):
        if self.ir is None:
            from ..frontends.dynamo import export_rebuilt
            self.ir = export_rebuilt(self.rebuilt)
            self.keep = self.ir.meta.get("dynamo_user_inputs")
        user = self._user(args)
        if self.lowered is not None:
            return tuple(self.lowered.run_flat(list(user)))
        calibration = self._calibration()
        if calibration is None and _needs_calibration(self.recipe):
            self.observed.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                       for a in user))
            if len(self.observed) < self.opts.observe_calls:
                with torch.no_grad():
                    return self.gm(*args)
            calibration = self.observed
        self.lowered = self._build(user, calibration)
        self.observed = []
        return tuple(self.lowered.run_flat(list(user)))

    def _build(self, args: tuple, calibration):
        from ..passes.base import PassContext
        from ..passes.manager import PassManager
        from .base import get_backend

        ir = self.ir
        if self.recipe.entries:
            ctx = PassContext(example_inputs=args, calibration=calibration, original=self.gm)
            ir, report = PassManager(self.recipe.passes()).run(ir, ctx)
            self.report["passes"] = report
        options = dict(self.opts.backend_options or {})
        if self.opts.lower_to == "onnxruntime" and calibration is not None:
            options.setdefault("calibration", calibration)
        lowered = get_backend(self.opts.lower_to)(ir, args, device="cpu", **options)
        self.report["lowered"] = lowered.report
        self.lowered_ir = ir
        return lowered


def fxpress_backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                    options: dict | None = None, mode: str | None = None):
    """torch.compile backend (entry point group torch_dynamo_backends, name "fxpress")."""
    if mode not in (None, "default"):
        raise RecipeError("backend 'fxpress' takes no mode; use options={'lower_to': ...}",
                          field="mode", value=mode)
    from ..frontends.dynamo import rebuild_dynamo_graph

    opts = HookOptions.from_dict(options)
    return _Hooked(gm, rebuild_dynamo_graph(gm, example_inputs), opts)
