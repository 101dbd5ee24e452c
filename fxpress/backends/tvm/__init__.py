"""TVM backend: the IR (float or int8 Q/DQ form) lowered to Relax, optionally MetaSchedule-tuned.

    run = fxpress.lower(cm, backend="tvm", example_inputs=(x,))                 # templates
    run = fxpress.lower(cm, backend="tvm", example_inputs=(x,),
                        tune=TuneOptions(trials=2000, time_budget_s=600))       # tuned, cached
    run.save("model.so"); y = fxpress.backends.tvm.load("model.so")(x)

On CPU every kernel gets a schedule without tuning (`schedules.py`: NHWC conv register
tiles over prepacked weights, parallel + vectorized loops elsewhere); tuning measures the
templates' candidate tiles first, then spends what is left of the budget on MetaSchedule's
search for the kernels no template covers. `run.report["schedules"]` counts which kernels
got what. Parallel loops take their work in chunks from an atomic counter instead of TVM's
one-share-per-thread split (`parallel.py`; `run.report["parallel"]`). ResNet-18 here:
2.2 s as legalized, 23-32 ms with the templates depending on how busy the host is
(ORT fp32: 21-25 ms; docs/results/tvm_cpu.md).

The llvm target comes from the host's features (`target.py`, `fxpress.hw`), never from
LLVM's CPU name alone: a VM that hides AVX-512 gets x86-64-v3 + mattr, not znver4. int8
convs use an 8x4 dot-product tensor intrinsic (`intrin.py`): vpdpbusd on VNNI hosts,
vpmaddubsw + vpmaddwd on AVX2-only hosts where the weights cannot saturate the int16 pair
sums (`run.report["schedules"]["int8_intrinsic:..."]` counts them).

Tuning records are kept per (graph hash, host feature key, target) under the user cache directory
(``$FXPRESS_TVM_CACHE``, else ``$XDG_CACHE_HOME/fxpress/tvm``, else ``~/.cache/fxpress/tvm``);
the next compile of the same graph for the same target re-uses them and tunes nothing.
"""
from __future__ import annotations

import os
import time
from typing import Any

from torch import fx

from ... import hw
from ...errors import RecipeError
from ...ir.signature import signature
from ..base import flat_graph
from .build import (
    TVMLowered,
    TVMModule,
    build,
    host_target,
    load,
    lower_relax,
    make_target,
    usable_cores,
)
from .convert import to_relax
from .target import target_lanes
from .tune import TuneOptions, cache_root, database_dir, load_database, tune

# TVM's runtime sizes its thread pool once, from TVM_NUM_THREADS, else half the logical CPUs
# on x86 (it assumes hyper-threading): on this 2-core VM that is one thread, half the machine
# ORT and Inductor use. Default it to the cores this process may run on, before any TVM
# kernel runs (compiling folds weight repacks with TVM kernels and would size the pool).
os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))

__all__ = ["TVMLowered", "TVMModule", "TuneOptions", "compile_tvm", "host_target", "load"]


def compile_tvm(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                tune: TuneOptions | bool | None = None, target: Any = None) -> TVMLowered:
    """Lower `gm` to TVM for `device` ("cpu" or "cuda"); `tune` enables MetaSchedule.

    `tune=True` uses `TuneOptions()` defaults; `target` overrides the detected target
    (a tvm.target.Target or its dict form). `example_inputs` are the IR's flat inputs.

    Shapes: the schedule templates and tuned kernels are written for static shapes, so a
    graph with a dynamic batch is compiled for the example shape here and again, once, for
    each new input shape a call brings (cached on the returned object; a new shape reuses a
    tuning database of its own shape if one exists, else gets the templates: it is not
    tuned at call time). `run.report["shapes"]` lists what was compiled and how.
    """
    if tune is True:
        tune = TuneOptions()
    elif tune is False:
        tune = None
    elif tune is not None and not isinstance(tune, TuneOptions):
        raise RecipeError("tune must be a TuneOptions or a bool", field="tune", value=tune)
    tgt = make_target(device, target)
    # the host target's vector width is hw's; an explicit target's is what LLVM gives it
    lanes = target_lanes(tgt, hw.host() if target is None and device == "cpu" else None)
    flat = flat_graph(gm)  # backends compile flat placeholders; Lowered.__call__ does the pytree

    def compile_shape(inputs: tuple, search: bool):
        t0 = time.perf_counter()
        imp = to_relax(flat, tuple(inputs))
        report: dict[str, Any] = {"target": str(tgt), "graph_key": imp.key, "lowering": dict(imp.stats)}
        database = None
        if tune is not None and search:
            lowered = lower_relax(imp.mod, tgt, schedule=False)  # tasks are the unscheduled kernels
            database, report["tuning"] = _tune(lowered, tgt, imp.key, tune, lanes)
        elif tune is not None and tune.use_cache:  # a later shape: a record set of its own, if any
            database = load_database(database_dir(cache_root(tune.cache_dir), imp.key, tgt), imp.key, tgt)
            report["tuning"] = {"cached": database is not None, "trials": 0, "seconds": 0.0}
        kinds: dict[str, int] = {}
        mod = lower_relax(imp.mod, tgt, database, counts=kinds, lanes=lanes)
        report["schedules"] = kinds
        report["compile_s"] = round(time.perf_counter() - t0, 2)
        return build(mod, tgt), report

    executable, report = compile_shape(tuple(example_inputs), True)
    recompile = (lambda inputs: compile_shape(inputs, False)) if signature(gm).is_dynamic else None
    return TVMLowered(gm, executable, tgt, report, recompile=recompile, example_inputs=example_inputs)


_tune = tune  # the module-level name `tune` is shadowed by compile_tvm's argument
