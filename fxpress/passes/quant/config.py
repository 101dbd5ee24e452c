"""Quantize: the recipe entry for PTQ (static, dynamic) and QAT, and the spec strings it reads.

    fxpress.Quantize(mode="static")      # per-channel symmetric int8 weights, uint8 affine acts
    fxpress.Quantize(mode="static", weights="int8-per-channel-symmetric",
                     activations="uint8-per-tensor-affine", observer="histogram")
    fxpress.Quantize(mode="dynamic")     # activation qparams chosen at run time
    fxpress.Quantize(mode="qat")         # fake-quant + trainable BN; then fxpress.convert(cm)

A spec string is ``dtype-granularity-scheme``: ``int8-per-channel-symmetric`` (narrow range
[-127, 127], zero point 0), ``uint8-per-tensor-affine``, ... or ``none`` (leave in float).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

from ...errors import RecipeError
from ...ir.meta import QuantSpec
from ...registry import check_choice, check_range, recipe_entry
from ..base import Pass, RecipeEntry

__all__ = ["Quantize", "parse_spec", "WEIGHT_SPECS", "ACTIVATION_SPECS", "OP_KINDS",
           "STATIC_OBSERVERS", "QAT_OBSERVERS"]

WEIGHT_SPECS = ("int8-per-channel-symmetric", "int8-per-channel-affine",
                "int8-per-tensor-symmetric", "int8-per-tensor-affine", "none")
ACTIVATION_SPECS = ("uint8-per-tensor-affine", "int8-per-tensor-affine",
                    "int8-per-tensor-symmetric", "uint8-per-tensor-symmetric", "none")
STATIC_OBSERVERS = ("auto", "minmax", "moving_average", "histogram", "mse", "entropy")
QAT_OBSERVERS = ("moving_average", "minmax", "lsq")
OP_KINDS = ("conv", "linear", "matmul", "add", "cat", "pool", "embedding")


def parse_spec(text: str, *, weight: bool, observer: str, dynamic: bool = False,
               field_name: str = "weights") -> QuantSpec | None:
    """'int8-per-channel-symmetric' -> QuantSpec (None for 'none'); RecipeError names the field."""
    check_choice(field_name, text, WEIGHT_SPECS if weight else ACTIVATION_SPECS)
    if text == "none":
        return None
    dtype, _, rest = text.partition("-")
    per_channel = rest.startswith("per-channel")
    symmetric = rest.endswith("symmetric")
    return QuantSpec(dtype=dtype, qscheme="per_channel" if per_channel else "per_tensor",
                     symmetric=symmetric, axis=0 if per_channel else None,
                     # symmetric int8 weights use [-127, 127] so -w quantizes like w (and the
                     # int8 x int8 products of VNNI kernels cannot overflow their int16 pairs)
                     narrow_range=weight and symmetric and dtype == "int8",
                     dynamic=dynamic, observer=observer)


@recipe_entry
@dataclass(frozen=True)
class Quantize(RecipeEntry):
    """Quantize convs, linears, matmuls, adds, cats, pools (embeddings weight-only) to int8.

    mode: "static" (calibrated activation ranges), "dynamic" (activation ranges computed at
      run time; linear/matmul inputs only) or "qat" (fake-quant for training, then
      ``fxpress.convert(cm)``).
    observer: static: auto | minmax | moving_average | histogram | mse | entropy (default auto:
      minmax on transformers (widened where the calibration is tiny), histogram elsewhere;
      see specs_for);
      qat: moving_average | minmax | lsq (learned ranges; default moving_average).
    percentile: clipping percentile of the histogram observer.
    calib_batches / calib_samples: stop calibrating after this many batches (when given),
      else after this many samples.
    skip: module-path patterns (fnmatch, e.g. "classifier", "encoder.*.attention.*") left in float.
    overrides: {pattern: {"weights": spec, "activations": spec}} (a bare string sets weights).
    ops: which op kinds to quantize. quantize_outputs: also quantize conv/linear/matmul outputs.
    conv_add: a conv whose output feeds a residual add. "auto" (default): the form is chosen at
      lowering for the target: the IR quantizes the conv output ("separate", exact on ORT and
      TVM: no requantization the IR lacks) and Inductor's lowering drops that Q/DQ to fuse
      conv + add (one rounding fewer than the IR).
      "fuse": the conv output stays
      float into the add, as torchao's X86InductorQuantizer does; Inductor runs conv + add (+ relu)
      as one oneDNN int8 kernel; the ORT backend, which has no such kernel, requantizes the conv
      output at lowering (an extra rounding the IR does not have: ~23 dB vs the IR on a random
      MobileNetV2). "separate": the conv output gets its own observed Q/DQ and the add its
      inputs' ranges (ORT's QLinearConv -> QLinearAdd, XNNPACK's form): the ORT lowering is then
      the IR's numerics exactly, at one extra requantization per residual on Inductor.
    reduce_range: int8 weights in [-64, 64] (7 bits and a sign) instead of [-127, 127]. On x86
      CPUs without VNNI (AVX2), the u8 x s8 int8 kernels of ORT/oneDNN/fbgemm add products in
      int16 pairs that saturate on full-range weights; with this the ORT backend runs them at
      full speed and bit-exact (it otherwise shifts the weights to uint8: exact but ~1.4x slower).
      Costs weight resolution (ResNet-18: ~2.8 dB SQNR vs fp32). Same as weight_range="reduced".
    weight_range: "auto" | "full" | "reduced": the int8 weight form per layer from the host's
      ISA (``fxpress.hw``; see passes/quant/weight_form.py). auto: full-range s8 with VNNI;
      without it full range where every adjacent K-pair |w0|+|w1| <= 128, else [-64, 64] (exact
      and fast on vpmaddubsw). full: never requantize (u8 x u8 where the pairs do not fit).
      Each weight's choice is a WeightForm record and a row of report["quant_weight_forms"].
    latency_check: "auto" times each conv/linear float vs int8 on `latency_backend` (the
      latency service, cached per shape/ISA/backend) and keeps it float where int8 is slower
      (report["quant_latency"]: both timings per layer); "off" quantizes every layer.
    smooth: SmoothQuant migration strength alpha in (0, 1) (e.g. 0.5): per-channel rescaling of
      linear inputs into their weights, measured on the calibration batches (the example
      inputs where dynamic mode got none). "auto" (default): 0.75 in dynamic mode, 0.5 in
      static mode, on graphs with a layer_norm (transformers) only; None: off.
    sensitivity: measure per-layer SQNR (each layer quantized alone) into cm.report.
    keep_float: keep this many of the most sensitive layers in float.
    guard_metric / guard_budget / guard_max_float: accuracy-guarded mode: keep the most sensitive
      layers in float, one by one, until ``fp32_metric - metric(module) <= guard_budget``
      (metric higher is better) or guard_max_float layers are float.
    pads: "int8" (default): a constant pad before a conv becomes the conv's padding where
      symmetric and a pad of the uint8 tensor (the zero point) otherwise, so no float pad sits
      between two int8 convs (passes/quant/pad_fold.py); "float": leave pads as captured.
    float_outputs: the model's outputs leave unrounded (no quantize -> dequantize pair that
      only feeds a graph output; passes/quant/float_outputs.py). Off by default: on ORT the
      last conv/linear then runs as a float kernel on int8 weights (not QLinearConv).
    equalize: static: cross-layer equalization of conv -> ReLU/ReLU6 -> depthwise conv chains
      from calibrated channel ranges (passes/quant/cle.py; report["cle"] per pair).
    bias_correction: static: add E[y_fp] - E[y_q] (per output channel, measured on the
      calibration batches, layer by layer) to each int8 conv/linear bias
      (passes/quant/bias_correction.py; report["bias_correction"] per layer). "auto"
      (default): on for static graphs with a depthwise conv and calibration data
      (bias_correction.auto_skip); True: always (static); False: off.
    adaround: static: learn each int8 conv/linear weight's rounding (up or down) on the
      calibration data (AdaRound; passes/quant/adaround.py; report["adaround"] per layer).
      False (default) | True (500 iterations per layer) | an iteration count. Bias correction
      (True, or "auto" where it applies) then runs in AdaRound's sweep against the float weights.
    float_policy: static: "auto" (default): per-node sensitivity on the calibration batches
      keeps float the nodes whose int8 form alone costs far more than the rest (residual adds,
      LayerNorm/softmax inputs, attention scores, a linear on GELU outliers; rule in
      passes/quant/sensitivity.py); report["quant_float_nodes"] names each with its dB.
      "off": quantize every annotated node.
    freeze_bn_after / freeze_observer_after: QAT training steps after which BN statistics /
      observed ranges stop updating.
    """

    name: ClassVar[str] = "quantize"
    mode: str = "static"
    weights: str = "int8-per-channel-symmetric"
    activations: str = "uint8-per-tensor-affine"
    observer: str | None = None
    percentile: float = 99.99
    calib_batches: int | None = None
    calib_samples: int = 200
    skip: tuple = ()
    overrides: dict = field(default_factory=dict)
    ops: tuple = OP_KINDS
    quantize_outputs: bool = True
    conv_add: str = "auto"
    reduce_range: bool = False
    weight_range: str = "auto"
    latency_check: str = "off"
    latency_backend: str = "inductor"
    smooth: float | str | None = "auto"
    sensitivity: bool = False
    keep_float: int = 0
    guard_metric: Callable[[Any], float] | None = None
    guard_budget: float = 0.01
    guard_max_float: int = 8
    float_policy: str = "auto"
    freeze_bn_after: int = 200
    freeze_observer_after: int = 400
    pads: str = "int8"
    bias_correction: bool | str = "auto"
    equalize: bool = False
    float_outputs: bool = False
    adaround: bool | int = False

    def __post_init__(self):
        check_choice("mode", self.mode, ("static", "dynamic", "qat"))
        parse_spec(self.weights, weight=True, observer="minmax", field_name="weights")
        parse_spec(self.activations, weight=False, observer="minmax", field_name="activations")
        observers = QAT_OBSERVERS if self.mode == "qat" else STATIC_OBSERVERS
        default = {"static": "auto", "dynamic": "minmax", "qat": "moving_average"}[self.mode]
        object.__setattr__(self, "observer", self.observer or default)
        check_choice("observer", self.observer, observers)
        if self.mode == "dynamic":
            if self.activations == "none":
                raise RecipeError("dynamic quantization quantizes activations at run time; "
                                  "use weights-only static quantization for float activations",
                                  field="activations", value=self.activations,
                                  accepted=[a for a in ACTIVATION_SPECS if a != "none"])
            if self.weights == "none":
                raise RecipeError("dynamic quantization needs quantized weights", field="weights",
                                  value=self.weights, accepted=WEIGHT_SPECS[:-1])
        if self.weights == "none" and self.activations == "none":
            raise RecipeError("weights and activations are both 'none': nothing to quantize",
                              field="weights", value=self.weights, accepted=WEIGHT_SPECS[:-1])
        check_choice("reduce_range", self.reduce_range, (False, True))
        from .weight_form import POLICIES
        check_choice("weight_range", self.weight_range, POLICIES)
        if self.reduce_range:
            if self.weight_range == "full":
                raise RecipeError("reduce_range=True asks for [-64, 64] weights; weight_range="
                                  "'full' asks for full range", field="weight_range",
                                  value=self.weight_range, accepted=["auto", "reduced"])
            object.__setattr__(self, "weight_range", "reduced")
        check_choice("conv_add", self.conv_add, ("auto", "fuse", "separate"))
        check_choice("latency_check", self.latency_check, ("auto", "off"))
        from ...latency import BACKENDS
        check_choice("latency_backend", self.latency_backend, BACKENDS)
        check_range("percentile", self.percentile, 50.0, 100.0, lo_open=True)
        if self.calib_batches is not None:
            check_range("calib_batches", self.calib_batches, 1)
        check_range("calib_samples", self.calib_samples, 1)
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        for s in skip:
            if not isinstance(s, str):
                raise RecipeError("skip patterns are strings", field="skip", value=s)
        object.__setattr__(self, "skip", skip)
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        for o in ops:
            check_choice("ops", o, OP_KINDS)
        object.__setattr__(self, "ops", ops)
        if not isinstance(self.overrides, dict):
            raise RecipeError("overrides is a {pattern: spec} mapping", field="overrides",
                              value=self.overrides)
        for pat, spec in self.overrides.items():
            spec = {"weights": spec} if isinstance(spec, str) else spec
            if not isinstance(spec, dict) or set(spec) - {"weights", "activations"}:
                raise RecipeError("override values are a weights spec string or "
                                  "{'weights': ..., 'activations': ...}",
                                  field=f"overrides[{pat!r}]", value=spec)
            if "weights" in spec:
                parse_spec(spec["weights"], weight=True, observer="minmax",
                           field_name=f"overrides[{pat!r}].weights")
            if "activations" in spec:
                parse_spec(spec["activations"], weight=False, observer="minmax",
                           field_name=f"overrides[{pat!r}].activations")
        if self.smooth == "auto":
            pass  # resolved per graph: smooth_alpha()
        elif self.smooth is not None:
            if isinstance(self.smooth, str):
                check_choice("smooth", self.smooth, ("auto",))
            check_range("smooth", self.smooth, 0.0, 1.0, lo_open=True, hi_open=True)
            if self.mode == "qat":
                raise RecipeError("SmoothQuant rescaling is a PTQ step", field="smooth",
                                  value=self.smooth)
        check_range("keep_float", self.keep_float, 0)
        check_range("guard_budget", self.guard_budget, 0.0)
        check_range("guard_max_float", self.guard_max_float, 0)
        if self.guard_metric is not None and not callable(self.guard_metric):
            raise RecipeError("guard_metric is a callable(module) -> float", field="guard_metric",
                              value=self.guard_metric)
        if self.mode != "static" and (self.guard_metric is not None or self.keep_float):
            raise RecipeError("sensitivity-guarded float layers need calibrated (static) ranges",
                              field="guard_metric" if self.guard_metric else "keep_float",
                              value=self.guard_metric or self.keep_float)
        check_choice("float_policy", self.float_policy, ("auto", "off"))
        check_range("freeze_bn_after", self.freeze_bn_after, 0)
        check_range("freeze_observer_after", self.freeze_observer_after, 0)
        check_choice("pads", self.pads, ("int8", "float"))
        check_choice("bias_correction", self.bias_correction, (False, True, "auto"))
        check_choice("equalize", self.equalize, (False, True))
        check_choice("float_outputs", self.float_outputs, (False, True))
        if self.equalize and self.mode != "static":
            raise RecipeError("cross-layer equalization uses calibrated (static) ranges",
                              field="equalize", value=self.equalize)
        if self.bias_correction is True and self.mode != "static":
            raise RecipeError("bias correction measures calibrated (static) int8 layers",
                              field="bias_correction", value=self.bias_correction)
        if not isinstance(self.adaround, bool):
            if not isinstance(self.adaround, int):
                raise RecipeError("adaround is False, True or an iteration count", field="adaround",
                                  value=self.adaround, accepted=[False, True, "an int >= 1"])
            check_range("adaround", self.adaround, 1)
        if self.adaround is not False and self.mode != "static":
            raise RecipeError("AdaRound learns roundings on calibrated (static) int8 layers",
                              field="adaround", value=self.adaround)

    # -- what the passes read ---------------------------------------------------------
    def specs_for(self, module: str, *, transformer: bool = False
                  ) -> tuple[QuantSpec | None, QuantSpec | None]:
        """(weight spec, activation spec) for the layer at `module` (None: stays float).

        observer "auto" (the static default): "minmax_tail" on transformers (`transformer`: the
        graph has a layer_norm or an attention, annotate.is_transformer), whose linear inputs
        carry outlier channels a percentile clips (real MiniLM: histogram 0.894 min cosine,
        minmax 0.9975): min/max, widened by a fitted tail where fewer than 32 samples were
        seen (observers.TailMinMaxObserver), else "histogram"."""
        w, a = self.weights, self.activations
        for pat, spec in self.overrides.items():
            if fnmatch.fnmatchcase(module, pat):
                spec = {"weights": spec} if isinstance(spec, str) else spec
                w, a = spec.get("weights", w), spec.get("activations", a)
        wobs = "lsq" if self.observer == "lsq" else "minmax"
        wspec = parse_spec(w, weight=True, observer=wobs)
        if wspec is not None and self.weight_range == "reduced" and wspec.dtype == "int8":
            wspec = replace(wspec, reduce_range=True)
        observer = self.observer
        if observer == "auto":
            observer = "minmax_tail" if transformer else "histogram"
        return (wspec,
                parse_spec(a, weight=False, observer=observer, dynamic=self.mode == "dynamic",
                           field_name="activations"))

    def smooth_alpha(self, transformer: bool) -> float | None:
        """SmoothQuant's alpha for a graph: `smooth` as given; "auto": 0.75 (dynamic) / 0.5
        (static) on transformers (a graph with a layer_norm), none elsewhere.

        Measured on the real MiniLM-L6 (docs/CONTRACTS.md, session 7): dynamic int8 with alpha
        0.75 keeps the GELU outputs' outlier channels of the FFN down-projections in range."""
        if self.smooth != "auto":
            return self.smooth
        if not transformer or self.mode == "qat":
            return None
        return 0.75 if self.mode == "dynamic" else 0.5

    def skipped(self, module: str) -> bool:
        return any(fnmatch.fnmatchcase(module, p) or module.startswith(p + ".") for p in self.skip)

    def passes(self) -> list[Pass]:
        from ..cleanup import DeadCodeElimination, FoldBatchNorm
        from .annotate import AnnotateQuant
        from .calibrate import Calibrate
        from .convert import ConvertToQDQ
        from .fold import FoldQDQ
        from .insert_observers import InsertObservers
        from .latency_check import LatencyCheck
        from .qat import PrepareQAT, QATFinetune
        from .sensitivity import Sensitivity
        from .smooth import SmoothQuant
        if self.mode == "qat":
            # BN stays: PrepareQAT turns conv+BN into a module that trains BN (folded at convert)
            return [AnnotateQuant(self), PrepareQAT(self), InsertObservers(self), Calibrate(self),
                    QATFinetune()]
        from .pad_fold import FoldPadIntoConv, PadInInt8
        from .weight_ops import WeightOps
        # addmm / matmul / einsum on a constant -> linear; computed (weight_norm) weights folded
        passes: list[Pass] = [WeightOps(), FoldBatchNorm()]
        if self.pads == "int8":
            passes.append(FoldPadIntoConv())
        if self.equalize and self.mode == "static":
            from .cle import CrossLayerEqualize
            passes.append(CrossLayerEqualize(self))
        if self.smooth is not None and self.mode != "qat":
            passes.append(SmoothQuant(self))
        passes.append(AnnotateQuant(self))
        if self.latency_check == "auto":
            passes.append(LatencyCheck(backend=self.latency_backend,
                                       dynamic=self.mode == "dynamic"))
        passes.append(InsertObservers(self))
        if self.mode == "static":
            passes.append(Calibrate(self))
            if self.sensitivity or self.keep_float or self.guard_metric is not None \
                    or self.float_policy == "auto":
                passes.append(Sensitivity(self))
        ada = self.adaround is not False and self.mode == "static"
        if ada:  # bias correction (True / "auto"): in AdaRound's sweep, against the float weights
            from .adaround import DEFAULT_ITERATIONS, AdaRound
            its = DEFAULT_ITERATIONS if self.adaround is True else int(self.adaround)
            passes.append(AdaRound(self, iterations=its, correct_bias=self.bias_correction))
        if self.bias_correction and self.mode == "static" and not ada:
            from .bias_correction import BiasCorrection
            passes.append(BiasCorrection(self, auto=self.bias_correction == "auto"))
        passes.append(ConvertToQDQ(weight_range=self.weight_range))
        if self.pads == "int8":
            passes.append(PadInInt8())
        if self.float_outputs:
            from .float_outputs import FloatOutputs
            passes.append(FloatOutputs())
        return passes + [FoldQDQ(),
                         DeadCodeElimination()]
