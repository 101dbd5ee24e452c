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

Int8 convs: on CPU hosts with VNNI/AMX, each int8 conv whose result is requantized (through
an optional residual add and relu) runs as ATen's prepacked oneDNN conv, an extern kernel in the
Inductor graph (``packed_convs="auto"``, backends/onednn_conv.py): Inductor's own
``qconv_pointwise`` rebuilds its oneDNN primitive on every call, the packed conv keeps it.
Everything else (input quantize, pools, linears, elementwise) is Inductor's as before.

Shapes: a dynamic dim of size 1 in the example (batch 1) compiles *static* at the example's
sizes: Dynamo specializes size 1 anyway, so a symbolic warm-up graph would never run for it
(the first real call recompiled; measured: two compiles, ~50 s for ResNet-18 here), and the
static graph prepacks oneDNN weights for the known input shape. Other sizes compile on first
use (Dynamo's automatic dynamic shapes); where that compile fails (some oneDNN int8 layouts
under symbolic sizes) the call falls back to one static compile per shape.

Wrapper: Inductor's generated Python wrapper costs ~25 us per int8 kernel call in a batch-1 CNN
(ResNet-18 int8, AMX host: 7.5 -> 6.7 ms median with the C++ wrapper, same kernels, bit-equal
outputs) but compiles a C++ file (ResNet-18: 3 s -> 11.5 s). ``wrapper="auto"`` takes the C++
wrapper on CPU for static compiles (batch 1: latency-bound, compiled once), the Python one
for dynamic shapes, and falls back to Python if the C++ compile fails (``report["wrapper"]``).
``FXPRESS_INDUCTOR_WRAPPER=python|cpp`` overrides "auto" for a process (the test suite uses
it to keep compiles short).

Threads: Inductor's kernels and oneDNN run on torch's OpenMP pool, whose workers spin-wait by
default. On a loaded machine that costs more than the int8 kernels save (ResNet-18 int8 here,
load 9: 145 ms median with ``OMP_WAIT_POLICY=ACTIVE``, 15.5 ms with ``PASSIVE``). libgomp reads
the variable once, when torch is imported, so the process has to set it
(``report["omp_wait_policy"]`` says what this process runs with).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..errors import LoweringError, RecipeError
from ..recipe import check_choice
from . import onednn_conv
from .base import Lowered, flat_graph
from .stem import space_to_depth_stems

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
        self._flat, self._mode, self._per_shape = None, None, None
        self._direct = None  # (input key, compiled fn) of a static compile without Dynamo

    def _run(self, flat_inputs: Sequence[torch.Tensor]) -> list:
        with torch.no_grad(), torch._inductor.config.patch(self._config):
            return list(self.compiled(*flat_inputs))

    def run_flat(self, flat_inputs: Sequence[torch.Tensor]):
        if self._direct is not None and _input_key(flat_inputs) == self._direct[0]:
            with torch.no_grad():
                return list(self._direct[1](*flat_inputs))
        try:
            return self._run(flat_inputs)
        except _COMPILE_ERRORS as e:  # a lazy recompile for a new size failed (symbolic
            if self._per_shape is not None or self._flat is None:  # sizes): static compiles
                raise                                               # per shape from now on
            self.report["shapes"] = f"one compile per input shape (a dynamic compile failed: " \
                                    f"{_first_line(e)[:200]})"
            self.compiled = self._per_shape = torch.compile(self._flat, backend="inductor",
                                                            mode=self._mode, dynamic=False)
            return self._run(flat_inputs)


    def save(self, path):
        """An AOTInductor package (.pt2) of the IR: ``torch._inductor.aoti_load_package(path)``
        runs it in a process without fxpress (flat inputs, dynamic dims kept), and
        ``fxpress.load(path)`` with the model's calling convention (the signature and pytree specs
        are the package's metadata). The package is compiled with freezing as the lowering was,
        but without the packed oneDNN convs (``fxpress::qconv2d`` is fxpress's C++ extension, not
        loadable without it): its int8 convs run on Inductor's own oneDNN kernels."""
        from ..saving import check_suffix, quiet_torch
        from .artefacts import spec_metadata
        from ..utils import atomic_write
        from .eager import export_program
        path = check_suffix(path, "inductor")
        with quiet_torch():
            flat = flat_graph(self.gm)
            for p in flat.parameters():
                p.requires_grad_(False)
            ep = export_program(flat, self.signature, self._out_spec, tuple(self.example_inputs))
        configs = {"freezing": bool(self._config.get("freezing", True)),
                   "aot_inductor.metadata": spec_metadata(self)}

        def write(tmp):
            # not under no_grad: measured, a digits-CNN int8 package compiled under no_grad
            # after a JIT compile in the same process was off by a requantization step (6.9 dB)
            with quiet_torch():
                torch._inductor.aoti_compile_and_package(ep, package_path=tmp,
                                                         inductor_configs=configs)
        return atomic_write(path, write)


def _input_key(flat_inputs: Sequence) -> tuple:
    """What a direct (static) compile was specialized on: each tensor's shape, strides, dtype,
    device; other inputs by value."""
    return tuple((tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor)
                 else x for x in flat_inputs)


def _compile_direct(lowered: InductorLowered, flat: fx.GraphModule, inputs: list,
                    config: dict, report: dict, use_cpp: bool) -> bool:
    """Compile `flat` for the example's shapes with ``torch._inductor.compile`` (no Dynamo):
    calls at those shapes skip Dynamo's guard check and the config patch, ~0.6 ms per
    ResNet-18 int8 call here (4.85 vs 5.45 ms, one interleaved run). Other shapes go
    through the Dynamo-compiled callable as before. False where the direct compile fails."""
    from torch._dynamo.utils import counters
    for n in flat.graph.nodes:  # the capture's shapes (its example batch): trace the inputs'
        for k in ("val", "tensor_meta", "example_value"):
            n.meta.pop(k, None)
    attempts = (True, False) if use_cpp else (bool(config.get("cpp_wrapper")),)
    for cpp in attempts:
        before = dict(counters["inductor"])
        try:
            with torch.no_grad(), torch._inductor.config.patch({**config, "cpp_wrapper": cpp}):
                fn = torch._inductor.compile(flat, list(inputs))
                fn(*inputs)
        except Exception as e:  # noqa: BLE001  (Inductor raises many types)
            if cpp and use_cpp:
                _python_wrapper_instead(e, config, report)
                continue
            report["call"] = f"through Dynamo (a direct compile failed: {_first_line(e)[:200]})"
            return False
        lowered._direct = (_input_key(inputs), fn)
        report["call"] = "direct at the example's shapes (no Dynamo guards); other shapes through Dynamo"
        report["kernels"] = _with_packed(inductor_kernel_counts(before), flat)
        return True
    return False


def _python_wrapper_instead(e: BaseException, config: dict, report: dict) -> None:
    """The C++ wrapper did not compile here: the Python one from now on, said in the report."""
    config["cpp_wrapper"] = report["config"]["cpp_wrapper"] = False
    report["wrapper"] = f"python (the C++ wrapper failed: {_first_line(e)[:200]})"


def _cpp_wrapper(wrapper: str, device, *, static: bool, user_set: bool) -> bool:
    """Whether this compile takes Inductor's C++ wrapper (see the module docstring)."""
    if user_set:  # an explicit cpp_wrapper Inductor option wins
        return False
    if wrapper == "auto":
        wrapper = os.environ.get("FXPRESS_INDUCTOR_WRAPPER", "auto")
        if wrapper not in ("python", "cpp"):
            wrapper = "cpp" if str(device) == "cpu" and static else "python"
    return wrapper == "cpp"


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# what a failed (re)compile raises out of the compiled callable (InductorError subclasses it)
_COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed,)


def _warmup_inputs(lowered: Lowered, example_inputs: tuple, device) -> tuple[list, str]:
    """(flat example inputs, "static" | "dynamic"): the example as it is where a dynamic dim
    has size 1 (static compile: Dynamo specializes size 1, see the module docstring), else
    clones with every dynamic dim marked for Dynamo (one compile serves every size >= 2)."""
    flat = [x.to(device) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    dyn = lowered.signature.dynamic_dims()
    if any(isinstance(x, torch.Tensor) and any(x.shape[d] == 1 for d in dims)
           for x, dims in zip(flat, dyn)):
        return flat, "static"
    out = []
    for x, dims in zip(flat, dyn):
        if isinstance(x, torch.Tensor) and dims:
            x = x.clone()
            for d in dims:
                torch._dynamo.mark_dynamic(x, d)
        out.append(x)
    return out, "dynamic"


def compile_inductor(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                     freezing: bool = True, mode: str = "default", warmup: bool = True,
                     space_to_depth: bool = True, wrapper: str = "auto",
                     packed_convs: str = "auto", **options: Any) -> InductorLowered:
    """Compile `gm` with Inductor (freezing on by default, scoped to this compile).

    Extra keyword options are Inductor config entries (``{"cpp.simdlen": 512}``) applied to
    this compile only. With `warmup` the compile happens now (on `example_inputs`) and
    ``report["kernels"]`` lists the int8 patterns Inductor lowered. `space_to_depth`: int8
    strided stems on <= 3 input channels left to Inductor's qconv lowering run as unshuffle +
    a stride-1 qconv (exact; backends/stem.py). `packed_convs` "auto": on CPU hosts with
    VNNI/AMX, int8 convs whose result is requantized run as ATen's prepacked oneDNN convs
    (backends/onednn_conv.py); "off": all on Inductor's own qconv lowering.
    ``report["packed_convs"]`` says which, ``report["layers"]`` the kernel of each conv/linear.
    """
    check_choice("mode", mode, _MODES)
    check_choice("packed_convs", packed_convs, ("auto", "off"))
    check_choice("wrapper", wrapper, ("auto", "python", "cpp"))
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda"):
        raise RecipeError("unknown device", field="device", value=device, accepted=["cpu", "cuda"])
    from torch._dynamo.utils import counters
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    flat = flat_graph(gm).to(device)  # freezing folds our weights in; keep the caller's IR intact
    # Quantize(conv_add="auto"): Inductor's form of a residual conv is conv + add in one kernel
    from ..passes.quant.fold import fuse_residual_quant
    fused_adds = fuse_residual_quant(flat)
    # packed convs first: a stem they take runs as one oneDNN conv on the NCHW input (2.87 vs
    # 3.39 ms for ResNet-18 with the stem unshuffled: Inductor's u8 pixel_unshuffle kernel alone
    # is 0.23-0.69 ms); the stem rewrite takes the int8 convs left to Inductor's qconv lowering
    handles, packed_how = [], "off"
    if packed_convs == "auto":
        ok, why = onednn_conv.available() if str(device) == "cpu" else (False, "not on CPU")
        handles = onednn_conv.packed_onednn_convs(flat) if ok else []
        packed_how = f"{len(handles)} convs" if ok else f"off ({why})"
    stems = space_to_depth_stems(flat) if space_to_depth else 0
    for p in flat.parameters():
        p.requires_grad_(False)
    config = {"freezing": bool(freezing), **options}
    try:
        with torch._inductor.config.patch(config):
            pass  # validates the option names now, as a RecipeError below
    except (AttributeError, KeyError) as e:
        raise RecipeError("unknown Inductor option", field=str(e), value=options) from e
    report: dict[str, Any] = {"config": dict(config), "threads": torch.get_num_threads(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    report["packed_convs"] = packed_how
    report["layers"] = onednn_conv.layer_kernels(flat)  # per conv/linear: the kernel chosen
    if stems or handles or fused_adds:
        report["rewrites"] = {k: v for k, v in (("space_to_depth_stem", stems),
                                                ("onednn_packed_conv", len(handles)),
                                                ("conv_add_fused", fused_adds)) if v}
    mode_arg = None if mode == "default" else mode
    compiled = torch.compile(flat, backend="inductor", mode=mode_arg, dynamic=None)
    lowered = InductorLowered(gm, compiled, example_inputs, report, config)
    onednn_conv.release_when_collected(lowered, handles)
    lowered._flat, lowered._mode = flat, mode_arg
    report["dynamic_dims"] = {s.name: [d for d in s.shape if isinstance(d, str)]
                              for s in lowered.signature.inputs if any(isinstance(d, str) for d in s.shape)}
    report["shapes"] = "dynamic" if report["dynamic_dims"] else "static"
    inputs, how = _warmup_inputs(lowered, example_inputs, device)
    use_cpp = _cpp_wrapper(wrapper, device, static=how == "static" or not report["dynamic_dims"],
                           user_set="cpp_wrapper" in options)
    if use_cpp:
        config["cpp_wrapper"] = True
        report["config"]["cpp_wrapper"] = True
    report["wrapper"] = "cpp" if config.get("cpp_wrapper") else "python"
    if not warmup:
        return lowered
    if report["dynamic_dims"] and how == "static":
        report["shapes"] = ("static at the example's sizes (a size-1 dynamic dim); other sizes "
                            "compile on first use")
    if (how == "static" or not report["dynamic_dims"]) and mode_arg is None and str(device) == "cpu" \
            and _compile_direct(lowered, flat, inputs, config, report, use_cpp):
        return lowered
    before = dict(counters["inductor"])
    if use_cpp:  # a C++ wrapper that does not compile here: the Python one, said in the report
        try:
            lowered._run(inputs)
        except Exception as e:  # noqa: BLE001  (Inductor raises many types)
            _python_wrapper_instead(e, config, report)
            lowered.compiled = torch.compile(flat, backend="inductor", mode=mode_arg, dynamic=None)
            before = dict(counters["inductor"])
    try:
        lowered._run(inputs)
    except Exception as e:  # Inductor raises many types; name the backend and keep the cause
        if how == "static" or not report["dynamic_dims"]:
            raise LoweringError(f"Inductor could not compile the IR: {type(e).__name__}: "
                                f"{_first_line(e)}") from e
        # some int8 kernels (oneDNN qconv layouts) fail under symbolic sizes: compile per
        # shape instead (Dynamo recompiles on each new size and caches the compiled graphs)
        report["shapes"] = f"one compile per input shape (dynamic compile failed: {_first_line(e)[:200]})"
        lowered.compiled = lowered._per_shape = torch.compile(flat, backend="inductor",
                                                              mode=mode_arg, dynamic=False)
        before = dict(counters["inductor"])
        try:
            lowered._run([x.to(device) if isinstance(x, torch.Tensor) else x
                          for x in example_inputs])
        except Exception as e2:
            raise LoweringError(f"Inductor could not compile the IR: {type(e2).__name__}: "
                                f"{_first_line(e2)}") from e2
    report["kernels"] = _with_packed(inductor_kernel_counts(before), flat)
    return lowered


def _with_packed(kernels: dict, flat: fx.GraphModule) -> dict:
    """Inductor's int8 pattern counts plus the packed oneDNN convs of the graph it compiled
    (they are int8 convs too: "qconv", with add in "qconv_binary", and "qconv_packed")."""
    unary, binary = onednn_conv.packed_counts(flat)
    if unary + binary:
        kernels = dict(kernels)
        kernels["qconv"] = kernels.get("qconv", 0) + unary + binary
        kernels["qconv_packed"] = unary + binary
        if binary:
            kernels["qconv_binary"] = kernels.get("qconv_binary", 0) + binary
    return kernels
