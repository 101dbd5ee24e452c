"""Inductor backend: compile the IR with torch.compile/Inductor so Q/DQ patterns become oneDNN kernels.

    run = fxpress.lower(cm, backend="inductor", example_inputs=(x,))
    run.report["kernels"]   # {'qconv': 20, 'qlinear': 1, ...} int8 patterns Inductor matched

Inductor only rewrites ``dq(act) + dq(w) -> conv/linear -> q`` into ``onednn.qconv_pointwise`` /
``qlinear_pointwise`` when freezing is on (weights become constants it can prepack). We turn
freezing on for *our* compile only, with ``torch._inductor.config.patch`` around every call of
the compiled function (compiles are lazy, so the first call and any recompile happen inside it);
the user's global ``torch._inductor.config`` is never touched. (``torch.compile(options=
{"freezing": True})`` is not enough: compile_fx decides on the freezing path before it applies
those options, and the prepack ops then reach fake-tensor propagation unfolded.)
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..errors import LoweringError, RecipeError
from ..recipe import check_choice
from .base import Lowered, flat_graph

__all__ = ["compile_inductor", "InductorLowered", "inductor_kernel_counts"]

# Inductor pattern counters that mean "an int8 kernel replaced Q/DQ + fp32 op", by kernel family.
_KERNEL_COUNTERS = {
    "qconv": ("qconv_unary_lower_count", "qconv2d_binary_lower_count"),
    "qlinear": ("qlinear_unary_lower_count", "qlinear_binary_lower_count"),
    # of those, the ones with a fused add (+relu) post-op (residual conv+add: one kernel, no
    # fp32 round trip of the sum)
    "qconv_binary": ("qconv2d_binary_lower_count",),
    "qlinear_binary": ("qlinear_binary_lower_count",),
    "qconv_prepack": ("qconv_weight_prepack_matcher_count",),
    "qlinear_prepack": ("qlinear_weight_prepack_matcher_count",),
    "qmaxpool2d": ("qmaxpool2d_matcher_count",),
    "qcat": ("qcat_matcher_count",),
    "qreshape": ("qreshape_matcher_count",),
    "dequant_promotion": ("dequant_promotion_matcher_count",),
}

_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


def inductor_kernel_counts(before: dict | None = None) -> dict[str, int]:
    """Int8 pattern hits in ``torch._dynamo.utils.counters['inductor']`` (minus a `before` snapshot)."""
    from torch._dynamo.utils import counters
    c = counters["inductor"]
    before = before or {}
    out = {}
    for fam, keys in _KERNEL_COUNTERS.items():
        n = sum(int(c.get(k, 0)) - int(before.get(k, 0)) for k in keys)
        if n:
            out[fam] = n
    return out


class InductorLowered(Lowered):
    """Calls are checked against the IR's signature, flattened, and run by the compiled flat graph."""

    backend = "inductor"

    def __init__(self, gm: fx.GraphModule, compiled, example_inputs: tuple, report: dict,
                 config: dict):
        super().__init__(gm)
        self.gm, self.compiled, self.example_inputs = gm, compiled, example_inputs
        self.report, self._config = report, config

    def run_flat(self, flat_inputs: Sequence[torch.Tensor]):
        with torch.no_grad(), torch._inductor.config.patch(self._config):
            return list(self.compiled(*flat_inputs))


def _warmup_inputs(lowered: Lowered, example_inputs: tuple, device) -> list:
    """Flat example inputs with every dynamic dim marked for Dynamo (a size-1 dim doubled first:
    Dynamo specializes size 1)."""
    flat = [x.to(device) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    out = []
    for x, dims in zip(flat, lowered.signature.dynamic_dims()):
        if isinstance(x, torch.Tensor) and dims:
            for d in dims:
                if x.shape[d] == 1:
                    x = torch.cat([x, x], dim=d)
            x = x.clone()
            for d in dims:
                torch._dynamo.mark_dynamic(x, d)
        out.append(x)
    return out


def compile_inductor(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                     freezing: bool = True, mode: str = "default", warmup: bool = True,
                     **options: Any) -> InductorLowered:
    """Compile `gm` with Inductor (freezing on by default, scoped to this compile).

    Extra keyword options are Inductor config entries (``{"cpp.simdlen": 512}``) applied to
    this compile only. With `warmup` the compile happens now (on `example_inputs`) and
    ``report["kernels"]`` lists the int8 patterns Inductor lowered.
    """
    check_choice("mode", mode, _MODES)
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda"):
        raise RecipeError("unknown device", field="device", value=device, accepted=["cpu", "cuda"])
    from torch._dynamo.utils import counters
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    flat = flat_graph(gm).to(device)  # freezing folds our weights in; keep the caller's IR intact
    for p in flat.parameters():
        p.requires_grad_(False)
    config = {"freezing": bool(freezing), **options}
    try:
        with torch._inductor.config.patch(config):
            pass  # validates the option names now, as a RecipeError below
    except (AttributeError, KeyError) as e:
        raise RecipeError("unknown Inductor option", field=str(e), value=options) from e
    # dynamic dims (the IR's signature) are marked on the warm-up inputs: one compile serves
    # every size; a static IR compiles static
    report: dict[str, Any] = {"config": dict(config)}
    compiled = torch.compile(flat, backend="inductor", mode=None if mode == "default" else mode,
                             dynamic=None)
    lowered = InductorLowered(gm, compiled, example_inputs, report, config)
    report["dynamic_dims"] = {s.name: [d for d in s.shape if isinstance(d, str)]
                              for s in lowered.signature.inputs if any(isinstance(d, str) for d in s.shape)}
    report["shapes"] = "dynamic" if report["dynamic_dims"] else "static"
    if not warmup:
        return lowered
    before = dict(counters["inductor"])
    try:
        lowered.run_flat(_warmup_inputs(lowered, example_inputs, device))
    except Exception as e:  # Inductor raises many types; name the backend and keep the cause
        if not report["dynamic_dims"]:
            raise LoweringError(f"Inductor could not compile the IR: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e
        # some int8 kernels (oneDNN qconv layouts) fail under symbolic sizes: compile per
        # shape instead (Dynamo recompiles on each new size and caches the compiled graphs)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        report["shapes"] = f"one compile per input shape (dynamic compile failed: {first[:200]})"
        lowered.compiled = torch.compile(flat, backend="inductor",
                                         mode=None if mode == "default" else mode, dynamic=False)
        before = dict(counters["inductor"])
        try:
            lowered.run_flat([x.to(device) if isinstance(x, torch.Tensor) else x
                              for x in example_inputs])
        except Exception as e2:
            raise LoweringError(f"Inductor could not compile the IR: {type(e2).__name__}: "
                                f"{str(e2).splitlines()[0] if str(e2) else ''}") from e2
    report["kernels"] = inductor_kernel_counts(before)
    return lowered
