"""Targets, the Relax build, the runnable artefact and its deployable library.

    target = host_target()                  # llvm with mcpu/mattr from fxpress.hw, host core count
    run = TVMLowered(gm, build(mod, target), target)
    run.save("model.so"); y = load("model.so")(x)     # load() needs TVM only, no fxpress passes
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from ...errors import InputError, LoweringError, RecipeError, UnsupportedOpError
from ...utils import atomic_write, atomic_write_text
from ..base import Lowered, flatten_inputs, unflatten_outputs

__all__ = [
    "TVMLowered",
    "TVMModule",
    "build",
    "cuda_target",
    "host_target",
    "load",
    "lower_relax",
    "make_target",
    "usable_cores",
]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_target(num_cores: int | None = None):
    """llvm for this CPU from its features (fxpress.hw), never from its name alone (target.py)."""
    from .target import host_target as _host_target
    return _host_target(num_cores or usable_cores())


def cuda_available() -> bool:
    import tvm
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # a TVM built without CUDA raises instead of saying False
        return False


def cuda_target():
    import tvm
    if not cuda_available():
        raise LoweringError("tvm backend: device='cuda' asked for but no CUDA device is visible to TVM")
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=host_target())


def make_target(device: str, target: Any = None):
    import tvm
    if target is not None:
        return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if device == "cpu":
        return host_target()
    if device.startswith("cuda"):
        return cuda_target()
    raise RecipeError("unknown device for the tvm backend", field="device", value=device,
                      accepted=["cpu", "cuda"])


def lower_relax(mod, target, database=None, schedule: bool = True, counts: dict | None = None,
                lanes: int | None = None):
    """Legalize + fuse (the 'zero' pipeline); apply tuned schedules from `database` if given.

    On CPU, convolutions are first converted to NHWC/HWIO (what the conv template in
    `schedules.py` is written for); every kernel without a tuning record then gets its
    template (`schedule=False` leaves them as legalized, which is what tuning extracts as
    tasks), and the weight repacks the templates ask for are split out and folded into the
    constants. `counts`, if given, receives how many kernels each kind of schedule got.
    """
    from tvm import relax

    cpu = target.kind.name == "llvm"
    with target:
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = relax.transform.CanonicalizeBindings()(mod)
        if cpu and _has_conv2d(mod):
            mod = _nhwc(mod)
        if database is not None:
            if cpu:  # records of int8 convs replay tensorize() with our intrinsics' names
                from .intrin import register
                register()
            with database:
                mod = relax.get_pipeline("zero")(mod)
        else:
            mod = relax.get_pipeline("zero")(mod)
        if cpu and schedule:
            from .intrin import plan
            from .schedules import apply_default_schedules
            mod, kinds = apply_default_schedules(mod, target, lanes, plan(mod, target))
            if counts is not None:
                counts.update(kinds)
        if cpu:
            mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            mod = relax.transform.FoldConstant()(mod)
            mod = relax.transform.DeadCodeElimination()(mod)  # the folded repack kernels
        if target.kind.name == "cuda":
            # GPU kernels need thread bindings; dlight gives every untuned kernel a default.
            from tvm.s_tir import dlight as dl
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
    return mod


def _has_conv2d(mod) -> bool:
    from tvm import relax
    calls = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    return any(getattr(c.op, "name", "") == "relax.nn.conv2d" for c in calls)


def _nhwc(mod):
    """Convolutions to NHWC activations / HWIO weights (transposes fold into the constants).

    TVM's ConvertLayout can fail on graphs it does not fully model (it has raised
    std::bad_alloc on a transformer layer here); then the convs stay NCHW and get the
    generic schedule instead of the conv template, with a warning.
    """
    from tvm import relax
    try:
        out = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
        return relax.transform.FoldConstant()(out)
    except Exception as e:  # noqa: BLE001 - TVM raises InternalError and others
        warnings.warn(f"tvm backend: ConvertLayout to NHWC failed ({type(e).__name__}: {e}); "
                      f"convolutions keep NCHW and the generic CPU schedule")
        return mod


def build(mod, target):
    import tvm
    try:
        return tvm.compile(mod, target=target)
    except Exception as e:
        kernel = failing_kernel(mod, target)
        if kernel is not None:  # name the ops TVM cannot compile instead of its internal check
            name, why = kernel
            raise UnsupportedOpError(f"{name} (a TVM kernel fused from these ops)",
                                     where=f"tvm backend: TVM cannot compile it for {target}: "
                                           f"{why}") from e
        raise LoweringError(f"tvm backend: build for {target} failed: {type(e).__name__}: {e}") from e


def failing_kernel(mod, target) -> tuple[str, str] | None:
    """(name, first error line) of the first kernel of `mod` that does not compile on its own
    (its name lists the fused ops, e.g. ``fused_less_equal_bitwise_and_where_add``), or None."""
    import tvm
    for gv, f in mod.functions.items():
        if type(f).__name__ != "PrimFunc":
            continue
        try:
            tvm.compile(tvm.IRModule({gv: f.with_attr("global_symbol", gv.name_hint)}), target=target)
        except Exception as e:  # noqa: BLE001 - TVM raises InternalError and others
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            return gv.name_hint, " ".join(lines[:3])[:300]
    return None


def _device(target):
    import tvm
    return tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)


def _to_tvm(t: torch.Tensor):
    import tvm
    return tvm.runtime.from_dlpack(t.detach().contiguous())


def _to_torch(x) -> list[torch.Tensor]:
    import tvm
    if isinstance(x, tvm.runtime.Tensor):
        return [torch.from_dlpack(x)]
    return [t for item in x for t in _to_torch(item)]


class _VMRunner:
    def __init__(self, executable, dev, torch_device: str):
        from tvm import relax
        self.vm = relax.VirtualMachine(executable, dev)
        self.torch_device = torch_device

    def run_flat(self, flat_inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        args = [_to_tvm(t.to(self.torch_device)) for t in flat_inputs if isinstance(t, torch.Tensor)]
        return _to_torch(self.vm["main"](*args))


def _shape_key(flat_inputs) -> tuple:
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in flat_inputs)


class TVMLowered(Lowered):
    """The TVM Relax VM for the IR; `report` says which ops went int8 and what tuning did.

    With `recompile` (a graph with dynamic dims), a call with a new input shape compiles the
    graph once more for that shape and keeps it; `report["shapes"]` lists every compiled shape.
    """

    backend = "tvm"

    def __init__(self, gm, executable, target, report: dict | None = None, *,
                 recompile: Callable | None = None, example_inputs: Sequence | None = None):
        super().__init__(gm)
        self.executable, self.target = executable, target
        self.report.update(report or {})
        self._recompile = recompile
        self._runner, self._library, self.report["parallel"] = self._load(executable)
        self._by_shape: dict[tuple, _VMRunner] = {}
        mode = "per-shape compile, cached (static kernels)" if recompile else "static"
        self.report["shapes"] = {"mode": mode, "compiled": []}
        self._example_key = _shape_key(example_inputs) if example_inputs is not None else None
        if example_inputs is not None:
            key = _shape_key(example_inputs)
            self._by_shape[key] = self._runner
            self.report["shapes"]["compiled"].append({"shape": key, "compile_s": self.report.get("compile_s")})

    def _load(self, executable):
        module, library, parallel = executable, None, "static (cuda)"
        if self.target.kind.name == "llvm":  # parallel loops take work in chunks (parallel.py)
            from .parallel import load_module
            t0 = time.perf_counter()
            module, parallel, library = load_module(executable)
            self.report["parallel_setup_s"] = round(time.perf_counter() - t0, 2)  # export + dlopen
            if library is not None:
                weakref.finalize(self, shutil.rmtree, str(library.parent), True)
        cuda = self.target.kind.name == "cuda"
        return _VMRunner(module, _device(self.target), "cuda" if cuda else "cpu"), library, parallel

    def _runner_for(self, flat_inputs) -> _VMRunner:
        if self._recompile is None:
            return self._runner  # static graph: Lowered's signature check already fixed the shape
        key = _shape_key(flat_inputs)
        runner = self._by_shape.get(key)
        if runner is None:
            executable, report = self._recompile(tuple(flat_inputs))
            runner = self._load(executable)[0]
            self._by_shape[key] = runner
            self.report["shapes"]["compiled"].append(
                {"shape": key, "compile_s": report["compile_s"], "schedules": report["schedules"],
                 "tuning": "cached database" if report.get("tuning", {}).get("cached") else "templates"})
        return runner

    def run_flat(self, flat_inputs):
        with torch.no_grad():
            return self._runner_for(flat_inputs).run_flat(flat_inputs)

    def save(self, path) -> Path:
        """Write a shared library (export_library) plus `<path>.json` with the I/O structure.

        The library is the one compiled for the example shape (`report["shapes"]`). Another
        suffix than ``.so`` is a RecipeError (``fxpress.load`` reads a ``.so`` back).
        """
        from ...saving import check_suffix
        path = check_suffix(path, "tvm")
        if self._library is not None:  # already exported for the chunked launcher
            atomic_write(path, lambda tmp: shutil.copyfile(self._library, tmp))
        else:
            atomic_write(path, lambda tmp: self.executable.export_library(tmp))
        meta = {"format": "fxpress-tvm-1", "target": str(self.target), "kind": self.target.kind.name,
                "input_shapes": [list(k) if k is not None else None for k in self._example_key or ()],
                "in_spec": pytree.treespec_dumps(self._in_spec) if self._in_spec else None,
                "out_spec": pytree.treespec_dumps(self._out_spec) if self._out_spec else None}
        atomic_write_text(_meta_path(path), json.dumps(meta, indent=1))
        return path


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class TVMModule:
    """A saved TVM library, runnable with the model's calling convention (no fxpress passes)."""

    def __init__(self, path):
        import tvm
        path = Path(path)
        meta_file = _meta_path(path)
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self._in_spec = pytree.treespec_loads(meta["in_spec"]) if meta.get("in_spec") else None
        self._out_spec = pytree.treespec_loads(meta["out_spec"]) if meta.get("out_spec") else None
        self._shapes = meta.get("input_shapes")
        cuda = meta.get("kind") == "cuda"
        dev = tvm.cuda(0) if cuda else tvm.cpu(0)
        module = tvm.runtime.load_module(str(path))
        if cuda:
            self.parallel = "static (cuda)"
        else:
            from .parallel import install
            self.parallel = install(path)
        self._runner = _VMRunner(module, dev, "cuda" if cuda else "cpu")

    def __call__(self, *args, **kwargs):
        flat = flatten_inputs(self._in_spec, args, kwargs)
        for i, (want, x) in enumerate(zip(self._shapes or (), flat)):
            if want is not None and isinstance(x, torch.Tensor) and list(x.shape) != want:
                raise InputError(f"saved tvm library: input {i} has shape {list(x.shape)}, but the library "
                                 f"was compiled for {want} (its kernels are static; save one per shape)",
                                 index=i)
        with torch.no_grad():
            return unflatten_outputs(self._out_spec, self._runner.run_flat(flat))


def load(path) -> TVMModule:
    """Load what `TVMLowered.save(path)` wrote."""
    return TVMModule(path)
