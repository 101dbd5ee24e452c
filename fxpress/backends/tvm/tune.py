"""MetaSchedule tuning with a trial budget, a time budget and a persistent per-graph database.

    db, info = tune(lowered_mod, target, graph_key, TuneOptions(trials=800, time_budget_s=600))

Where trials go: every task first gets one search round (a sampled schedule is already
parallel and vectorized, far better than the naive default), largest FLOPs first; the rest
of the budget is dealt out in rounds proportional to each task's FLOPs x occurrences, so the
convolutions that hold the time get the trials. The loop stops at whichever budget ends first.

The database (best record per workload, `dump_pruned`) is written atomically to
`<cache>/<graph key>-<target hash>/` with a manifest naming the key, target and TVM version;
a database whose manifest does not match, or that does not parse, is ignored with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ... import hw
from ...errors import LoweringError, RecipeError
from ...recipe import check_range
from ...utils import atomic_write_text

__all__ = [
    "TuneOptions",
    "cache_root",
    "database_dir",
    "load_database",
    "tracker_servers",
    "tune",
    "tuning_key",
]

_FORMAT = "fxpress-tvm-db-1"


@dataclass(frozen=True)
class TuneOptions:
    """MetaSchedule budget. `trials`: total measured candidates; `time_budget_s`: wall clock.

    `trials_per_round` is one search round (the budget's granularity); `trials_per_task`,
    if set, caps what any one kernel gets (template tiles nearest the default first, then
    search trials), so a whole network tunes in a bounded time on a small shared host;
    `cache_dir` overrides the database location; `progress` prints one line per round to stderr.

    `tracker=(host, port, key)` measures on the RPC servers registered under `key` at a TVM
    tracker (`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server --tracker
    host:port --key key`), as many at once as are free; records land in the same database.
    A tracker not answering within `rpc_timeout_s` is a LoweringError naming host and port:

        TuneOptions(trials=64, tracker=("127.0.0.1", 9190, "x86"))
    """

    name: ClassVar[str] = "tvm_tune"
    trials: int = 1000
    time_budget_s: float = 600.0
    trials_per_round: int = 16
    trials_per_task: int | None = None
    population: int = 256
    build_timeout_s: float = 30.0
    run_timeout_s: float = 30.0
    cache_dir: str | None = None
    use_cache: bool = True
    progress: bool = True
    tracker: tuple[str, int, str] | None = None
    rpc_timeout_s: float = 10.0

    def __post_init__(self):
        if self.tracker is not None:
            t = self.tracker
            if (not isinstance(t, (tuple, list)) or len(t) != 3 or not isinstance(t[0], str)
                    or isinstance(t[1], bool) or not isinstance(t[1], int) or not isinstance(t[2], str) or not t[2]):
                raise RecipeError("tracker must be (host: str, port: int, key: str)", field="tracker", value=t)
            object.__setattr__(self, "tracker", (t[0], int(t[1]), t[2]))
        check_range("rpc_timeout_s", self.rpc_timeout_s, 0, lo_open=True)
        check_range("trials", self.trials, 1)
        check_range("time_budget_s", self.time_budget_s, 0, lo_open=True)
        check_range("trials_per_round", self.trials_per_round, 1, 512)
        if self.trials_per_task is not None:
            check_range("trials_per_task", self.trials_per_task, 1)
        check_range("population", self.population, 16)
        check_range("build_timeout_s", self.build_timeout_s, 0, lo_open=True)
        check_range("run_timeout_s", self.run_timeout_s, 0, lo_open=True)


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else $FXPRESS_TVM_CACHE, else $FXPRESS_CACHE/tvm (fxpress's cache), else the
    user cache directory's fxpress/tvm."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("FXPRESS_TVM_CACHE"):
        return Path(os.environ["FXPRESS_TVM_CACHE"])
    if os.environ.get("FXPRESS_CACHE"):
        return Path(os.environ["FXPRESS_CACHE"]) / "tvm"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fxpress" / "tvm"


def _target_id(target) -> str:
    return hashlib.sha256(str(target).encode()).hexdigest()[:12]


def tuning_key(key: str, target, features: hw.HostFeatures | None = None) -> str:
    """Database name: graph key, the host's ISA feature key (fxpress.hw) and the target hash.

    Records measured with AVX-512 are never offered to a host without it, even for a target
    string that happens to be equal (an explicit target, or one LLVM prints the same).
    """
    feats = features or hw.host()
    return f"{key}-{feats.feature_key()}-{_target_id(target)}"


def database_dir(root: Path, key: str, target, features: hw.HostFeatures | None = None) -> Path:
    return root / tuning_key(key, target, features)


def _manifest(key: str, target, features: hw.HostFeatures | None = None) -> dict:
    import tvm
    return {"format": _FORMAT, "graph_key": key, "target": str(target), "tvm": tvm.__version__,
            "hw": (features or hw.host()).feature_key()}


def load_database(path: Path, key: str, target, features: hw.HostFeatures | None = None):
    """The JSONDatabase at `path` if its manifest matches (key, target, hw, TVM) and it parses."""
    from tvm.s_tir import meta_schedule as ms

    man_file = path / "manifest.json"
    if not man_file.exists():
        return None
    try:
        found = json.loads(man_file.read_text())
        want = _manifest(key, target, features)
        if found != want:
            diff = sorted(k for k in want if found.get(k) != want[k])
            warnings.warn(f"tvm tuning database {path} is for another graph/target/TVM "
                          f"(differs in {', '.join(diff)}); ignoring it and tuning afresh")
            return None
        db = ms.database.JSONDatabase(str(path / "workload.json"), str(path / "records.json"),
                                      allow_missing=False)
        if len(db) == 0:
            raise ValueError("no tuning records")
        return db
    except Exception as e:  # corrupt JSON, truncated files, records TVM cannot parse
        warnings.warn(f"tvm tuning database {path} is unreadable ({type(e).__name__}: {e}); "
                      f"ignoring it and tuning afresh")
        return None


def _task_flops(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops
    try:
        return max(float(estimate_tir_flops(task.dispatched[0])), 1.0)
    except Exception:  # opaque/extern functions have no estimate; treat as cheap
        return 1.0


def _plan(weights: list[float], trials: int, per_round: int) -> list[int]:
    """Task indices in the order they get rounds: one each (largest first), then by share."""
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    plan = list(order)
    rounds_left = max(trials // per_round - len(plan), 0)
    total = sum(weights)
    quota = {i: rounds_left * weights[i] / total for i in order}
    given = {i: 0 for i in order}
    for _ in range(rounds_left):
        i = max(order, key=lambda j: quota[j] - given[j])
        given[i] += 1
        plan.append(i)
    return plan


def tracker_servers(host: str, port: int, key: str, timeout_s: float = 10.0) -> int:
    """How many RPC servers under `key` the tracker at host:port has (LoweringError if none or
    if it does not answer within `timeout_s`)."""
    import socket
    where = f"the TVM RPC tracker at {host}:{port}"
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise LoweringError(f"tvm tuning: {where} cannot be reached within {timeout_s:g} s "
                            f"({type(e).__name__}: {e})") from e
    deadline = time.monotonic() + timeout_s
    while True:  # a server that just started registers within a second or two
        try:
            from tvm import rpc
            summary = rpc.connect_tracker(host, port).summary()
        except Exception as e:  # TVM raises RuntimeError, TVMError or OSError here
            raise LoweringError(f"tvm tuning: {where} did not answer a summary request "
                                f"({type(e).__name__}: {e})") from e
        queue = summary.get("queue_info", {}).get(key, {})
        n = int(queue.get("free", 0)) + int(queue.get("pending", 0))
        if n == 0:  # the queue counts only idle servers; busy ones are listed in server_info
            n = sum(1 for s in summary.get("server_info", []) if str(s.get("key", "")).split(":")[-1] == key)
        if n or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not n:
        raise LoweringError(f"tvm tuning: {where} has no RPC server registered under key {key!r} "
                            f"(keys there: {sorted(summary.get('queue_info', {}))})")
    return n


def tune(mod, target, key: str, opts: TuneOptions, lanes: int | None = None) -> tuple[Any, dict]:
    """Tune `mod` (already legalized and fused) for `target`; returns (database, report).

    Task extraction and FLOP weighting happen here; the search runs in `_tune_worker.py`
    (a child process with TVM only), and its pruned database is moved into the cache.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    db_path = database_dir(cache_root(opts.cache_dir), key, target)
    if opts.use_cache:
        db = load_database(db_path, key, target)
        if db is not None:
            return db, {"cached": True, "database": str(db_path), "seconds": 0.0, "trials": 0}

    t0 = time.perf_counter()
    servers = tracker_servers(*opts.tracker, opts.rpc_timeout_s) if opts.tracker else 0
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled", False)]
    weights = [_task_flops(t) * t.weight for t in extracted]
    from .intrin import plan as int8_plan
    intrins = int8_plan(mod, target)  # int8 convs' template candidates use the same intrinsics
    job_dir = Path(tempfile.mkdtemp(prefix="fxpress-tvm-tune-"))
    try:
        (job_dir / "tasks.json").write_text(tvm.ir.save_json([t.dispatched[0] for t in extracted]))
        job = {"target": str(target), "names": [t.task_name for t in extracted],
               "plan": _plan(weights, opts.trials, opts.trials_per_round), "trials": opts.trials,
               "per_round": opts.trials_per_round, "per_task": opts.trials_per_task,
               "population": opts.population,
               "time_budget_s": opts.time_budget_s, "spent_s": time.perf_counter() - t0,
               "build_timeout_s": opts.build_timeout_s, "run_timeout_s": opts.run_timeout_s,
               "progress": opts.progress, "lanes": lanes,
               "int8_intrins": [intrins.get(t.task_name) for t in extracted],
               "tracker": list(opts.tracker) if opts.tracker else None, "servers": servers,
               "rpc_timeout_s": opts.rpc_timeout_s}
        (job_dir / "job.json").write_text(json.dumps(job))
        worker = Path(__file__).with_name("_tune_worker.py")
        # One round may overrun the budget; beyond that something hangs: stop it.
        limit = opts.time_budget_s * 1.5 + 300
        try:
            proc = subprocess.run([sys.executable, str(worker), str(job_dir)], timeout=limit,
                                  stdout=subprocess.DEVNULL, stderr=None if opts.progress else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            warnings.warn(f"tvm tuning did not finish within {limit:.0f} s; building untuned")
            return None, {"cached": False, "failed": "timeout", "seconds": round(time.perf_counter() - t0, 1)}
        stats_file = job_dir / "stats.json"
        if proc.returncode != 0 or not stats_file.exists():
            warnings.warn(f"tvm tuning worker failed (exit code {proc.returncode}); building untuned")
            return None, {"cached": False, "failed": f"exit {proc.returncode}",
                          "seconds": round(time.perf_counter() - t0, 1)}
        stats = json.loads(stats_file.read_text())
        db = None
        if stats["records"]:
            _install(job_dir / "db", db_path, key, target)
            db = load_database(db_path, key, target)
        else:
            warnings.warn(f"tvm tuning measured no valid candidate ({stats['failed']} of "
                          f"{stats['measured']} failed); building untuned. First error: "
                          f"{stats['first_error']}")
        return db, {"cached": False, "database": str(db_path),
                    "seconds": round(time.perf_counter() - t0, 1), **stats}
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def _install(src: Path, path: Path, key: str, target) -> None:
    """Move a finished database into the cache: manifest written last, directory renamed in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name in ("workload.json", "records.json"):
            shutil.copyfile(src / name, tmp / name)
        atomic_write_text(tmp / "manifest.json", json.dumps(_manifest(key, target), indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
