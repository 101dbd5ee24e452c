"""MetaSchedule search in a child process: `python _tune_worker.py JOB_DIR` (TVM only, no torch).

Two phases share one MetaSchedule database, builder and runner. First every task's template
candidates (`schedules.candidates`: the conv register tiles; the generic schedule for other
kernels) are built and measured, largest task first: a few dozen measurements that put
every kernel near its best. The rest of the budget goes to MetaSchedule's evolutionary
search on the kernels no template covers. The pruned database keeps the fastest measured
record per kernel, whichever phase found it.

Run as a script by `tune.py`, for three reasons: a MetaSchedule crash (the segfaults NOTES
records) cannot take the user's process down; its logging and globals stay out of it; and
for x86 llvm targets only the x86 tensor intrinsics are registered. `TuneContext()` imports
`tvm.s_tir.tensor_intrin`, which parses every CUDA/ROCm/ARM/Hexagon intrinsic as TVMScript:
measured here at 76 CPU-seconds (4 minutes wall on the shared 2-core box) against 5 for x86.

JOB_DIR holds tasks.json (tvm.ir.save_json of the task modules) and job.json (target, task
names, trial plan, budgets); the pruned database goes to JOB_DIR/db/, stats to stats.json.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import types
from pathlib import Path


def _is_x86(target) -> bool:
    return target.kind.name == "llvm" and "x86" in str(target.attrs.get("mtriple", "x86"))


def _x86_intrinsics_only() -> None:
    """Stand in an x86-only `tvm.s_tir.tensor_intrin` package in this process.

    Also the LocalBuilder's initializer: each build round spawns fresh popen workers whose
    `default_build` imports `tvm.s_tir.tensor_intrin`; with every intrinsic that is over a
    minute per worker on 2 cores, so every candidate hit the build timeout (0 records).
    """
    import tvm.s_tir
    pkg = types.ModuleType("tvm.s_tir.tensor_intrin")
    pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules.setdefault("tvm.s_tir.tensor_intrin", pkg)
    import tvm.s_tir.tensor_intrin.x86


def _register_intrinsics(target) -> None:
    if _is_x86(target):
        _x86_intrinsics_only()
    else:
        import tvm.s_tir.tensor_intrin  # noqa: F401


def _failure_recorder():
    """A measure callback counting failed candidates and keeping the first error message.

    Without it a run whose every candidate fails (build timeout, runner crash) ends with
    0 records and no hint why; the message goes to stats.json and into tune()'s warning.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class FailureRecorder(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.failed, self.first = 0, None

        def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
            for b, r in zip(builder_results, runner_results):
                err = b.error_msg or r.error_msg
                if err:
                    self.failed += 1
                    self.first = self.first or str(err)[-1500:]  # the traceback's tail names the cause

    return FailureRecorder()


def _load_by_path(name: str):
    """`schedules.py` / `intrin.py` loaded by path: importing the fxpress package would import torch."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"fxpress_tvm_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _load_schedules():
    return _load_by_path("schedules")


def _measure_templates(S, mods, tiles, order, target, db, builder, runner, trials_left, deadline, lanes,
                       intrins):
    """Build and measure every template candidate of each task; commit the successful ones.

    `tiles[i]` are task i's conv tiles (empty: the generic schedule is its one candidate).
    Returns (trials measured, {task index: number of candidates}, failures, first error).
    """
    import shutil

    from tvm.s_tir import meta_schedule as ms
    trials, done, failed, first = 0, {}, 0, None
    for i in order:
        if trials >= trials_left or time.perf_counter() >= deadline:
            break
        func = mods[i]["main"]
        schs = [sch for sch in (S.schedule(func, c, lanes, intrins[i]) for c in (tiles[i] or [None]))
                if sch is not None][: trials_left - trials]
        if not schs:
            continue
        built = builder.build([ms.builder.BuilderInput(sch.mod, target) for sch in schs])
        ok = [(sch, b) for sch, b in zip(schs, built) if b.error_msg is None]
        for b in built:
            if b.error_msg is not None:
                failed += 1
                first = first or str(b.error_msg)[-1500:]
        futures = runner.run([ms.runner.RunnerInput(
            b.artifact_path, "cuda" if target.kind.name == "cuda" else "cpu",
            ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)) for sch, b in ok])
        workload = db.commit_workload(mods[i])
        for (sch, b), fut in zip(ok, futures):
            r = fut.result()
            shutil.rmtree(Path(b.artifact_path).parent, ignore_errors=True)
            if r.error_msg is not None:
                failed += 1
                first = first or str(r.error_msg)[-1500:]
                continue
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, workload, r.run_secs, target, ms.arg_info.ArgInfo.from_prim_func(func)))
        trials += len(schs)
        done[i] = len(schs)
    return trials, done, failed, first


def _nearest(S, func, tiles, lanes):
    """`tiles` ordered by distance from the default tile (accumulators, then channel block)."""
    d = S.default_choice(func, lanes)
    if d is None:
        return tiles
    return sorted(tiles, key=lambda c: (abs(c.wb * c.fb - d.wb * d.fb), abs(c.fb - d.fb), -c.wb))


def _best_ms(db, mod) -> str:
    recs = db.get_top_k(db.commit_workload(mod), 1)
    secs = [float(s) for s in recs[0].run_secs] if recs and recs[0].run_secs else []
    return f"{1e3 * sum(secs) / len(secs):.3f} ms" if secs else "n/a"


def main(job_dir: str) -> None:
    import tvm
    t0 = time.perf_counter()
    job_dir = Path(job_dir)
    job = json.loads((job_dir / "job.json").read_text())
    target = tvm.target.Target(json.loads(job["target"]))
    _register_intrinsics(target)
    from tvm.s_tir import meta_schedule as ms
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

    mods = list(tvm.ir.load_json((job_dir / "tasks.json").read_text()))
    threads = int(target.attrs.get("num-cores", 1)) if target.kind.name == "llvm" else "physical"
    ctxs = [ms.TuneContext(mod, target=target, space_generator="post-order-apply",
                           search_strategy=ms.search_strategy.EvolutionarySearch(
                               population_size=job["population"],
                               init_min_unmeasured=min(50, job["population"] // 4)),
                           task_name=name, num_threads=threads, rand_state=i + 1)
            for i, (mod, name) in enumerate(zip(mods, job["names"]))]
    work = job_dir / "work"
    work.mkdir(exist_ok=True)
    db = ms.database.JSONDatabase(work_dir=str(work))
    builder = ms.builder.LocalBuilder(timeout_sec=job["build_timeout_s"],
                                      initializer=_x86_intrinsics_only if _is_x86(target) else None)
    # Caches flushed before every run: inside the model a kernel's weights come cold from
    # memory, and measured hot (the same call repeated) the tiles with the least weight
    # reuse win -- a tuned ResNet-18 measured 44 ms against 36 ms for the untuned templates.
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=10, min_repeat_ms=0, enable_cpu_cache_flush=True)
    if job.get("tracker"):  # measure on the tracker's servers, one candidate per free server
        host, port, key = job["tracker"]
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key,
                                           session_timeout_sec=int(max(job["run_timeout_s"], 1))),
            evaluator_config=evaluator, max_workers=max(int(job.get("servers") or 1), 1))
        runner_name = f"rpc {host}:{port} key {key} ({job.get('servers')} servers)"
    else:
        runner = ms.runner.LocalRunner(timeout_sec=job["run_timeout_s"], evaluator_config=evaluator)
        runner_name = "local"
    cost_model = ms.cost_model.XGBModel(extractor=ms.feature_extractor.PerStoreFeature(),
                                        adaptive_training=True)
    failures = _failure_recorder()
    budget, total = job["time_budget_s"] - job["spent_s"], job["trials"]
    order = list(dict.fromkeys(job["plan"]))  # each task once, largest first
    S = _load_schedules()
    lanes = job.get("lanes") or S.vector_lanes(target)  # fxpress.hw's width for the host target
    tiles = [S.candidates(m["main"], lanes) for m in mods]
    per_task = job.get("per_task")
    if per_task:  # the tiles nearest the untuned default first: it is the one the others must beat
        tiles = [_nearest(S, m["main"], t, lanes)[:per_task] for m, t in zip(mods, tiles)]
    intrins = job.get("int8_intrins") or [None] * len(mods)
    if any(intrins):  # int8 conv candidates tensorized as the untuned template would be
        _load_by_path("intrin").register()
    trials, templated, tmpl_failed, tmpl_first = _measure_templates(
        S, mods, tiles, order, target, db, builder, runner, total, t0 + budget, lanes, intrins)
    done = [templated.get(i, 0) for i in range(len(ctxs))]
    if job["progress"]:
        print(f"[fxpress tvm tune] templates: {trials} candidates over {len(templated)} kernels in "
              f"{time.perf_counter() - t0 + job['spent_s']:.0f} s", file=sys.stderr, flush=True)
    searched = {i for i in range(len(ctxs)) if not tiles[i]}
    round_s = 0.0  # the longest search round so far: a round that cannot end in time is not started
    for i in job["plan"]:
        if trials >= total or time.perf_counter() - t0 + round_s >= budget:
            break
        if i not in searched:  # conv kernels: the template's measured tiles are kept
            continue
        n = min(job["per_round"], total - trials, (per_task or total) - done[i])
        if n <= 0:
            continue
        r0 = time.perf_counter()
        ms.tune_tasks(tasks=[ctxs[i]], task_weights=[1.0], work_dir=str(work),
                      max_trials_global=done[i] + n, num_trials_per_iter=n, builder=builder,
                      runner=runner, database=db, cost_model=cost_model,
                      measure_callbacks=[ms.measure_callback.AddToDatabase(),
                                         ms.measure_callback.RemoveBuildArtifact(),
                                         ms.measure_callback.UpdateCostModel(), failures],
                      task_scheduler="round-robin")
        done[i] += n
        trials += n
        round_s = max(round_s, time.perf_counter() - r0)
        if job["progress"]:
            print(f"[fxpress tvm tune] {trials}/{total} trials "
                  f"{time.perf_counter() - t0 + job['spent_s']:5.0f}/{job['time_budget_s']:.0f}s  "
                  f"task {i + 1}/{len(ctxs)} {job['names'][i][:36]:36s} best {_best_ms(db, ctxs[i].mod)}",
                  file=sys.stderr, flush=True)
    out = job_dir / "db"
    out.mkdir(exist_ok=True)
    pruned = ms.database.JSONDatabase(str(out / "workload.json"), str(out / "records.json"))
    db.dump_pruned(pruned)  # keeps the best *successful* record per workload
    (job_dir / "stats.json").write_text(json.dumps(
        {"trials": trials, "tasks": len(ctxs), "tasks_tuned": sum(1 for d in done if d),
         "templated": len(templated), "measured": len(db), "failed": tmpl_failed + failures.failed,
         "records": len(pruned), "first_error": tmpl_first or failures.first, "runner": runner_name}))


if __name__ == "__main__":
    main(sys.argv[1])
