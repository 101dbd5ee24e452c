"""ResNet-18 (batch 1, 224x224, random weights) on TVM: untuned, tuned fp32, tuned int8, vs ORT fp32.

    .venv/bin/python bench/tvm_bench.py --tune-seconds 600 --int8-tune-seconds 300

Tuning records go to --cache (default: a fresh temporary directory, so the first compile
really tunes); the script then compiles the fp32 graph again to show the cached database
is re-used (zero tuning seconds). All runners are kept and timed together at the end in
interleaved rounds; prints one markdown table (median, p10-p90, ratio to ORT fp32).

    .venv/bin/python bench/tvm_bench.py --resnet18 [--trials-per-task 4] [--fresh]

TVM fp32 tuned against TVM int8 tuned (fxpress Quantize(static) -> TVM) on this host and
on a simulated AVX2 + FMA host without AVX-512/VNNI (`compare`), ORT fp32 the
common reference, all five timed in one interleaved run, plus a per-layer fp32/int8 table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

# torch's OpenMP workers spin-wait after each torch op and steal the cores TVM's own thread
# pool runs on (measured: TVM ResNet-18 47 ms with the default policy, 32 ms with PASSIVE).
# Set before torch loads libgomp; ORT has its own pool and is not affected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import tvm

import fxpress
from fxpress.backends.tvm import TuneOptions, compile_tvm
from fxpress.backends.tvm.build import _VMRunner
from tests.models import resnet18


def interleaved_ms(runners: list, x, rounds: int, per_round: int = 5, max_s: float = 240.0):
    """Median and p10/p90 ms per runner, measured in interleaved rounds (each runner
    `per_round` calls per round, after a warm-up), so slow drifts of the shared host hit
    every runner alike instead of whichever ran last."""
    times: list[list[float]] = [[] for _ in runners]
    with torch.no_grad():
        for fn in runners:
            for _ in range(3):
                fn(x)
        t_end = time.perf_counter() + max_s
        for r in range(rounds):
            if r >= 3 and time.perf_counter() > t_end:
                break
            for i, fn in enumerate(runners):
                fn(x)  # re-warm after the other runners used the caches and cores
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    fn(x)
                    times[i].append((time.perf_counter() - t0) * 1e3)

    def pct(v, q):
        v = sorted(v)
        return v[min(len(v) - 1, int(q * len(v)))]

    return [(statistics.median(v), pct(v, 0.1), pct(v, 0.9)) for v in times]


def ort_fp32(model, x, threads: int):
    import onnxruntime as ort
    path = Path(tempfile.mkdtemp()) / "r18.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: sess.run(None, {name: t.numpy()})[0]


def quantize_fxpress(model, x):
    """Our own static int8 (fxpress.Quantize, per-channel weights, 8 calibration batches)."""
    from bench.peers import fxpress_quantize
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(x.shape, generator=g),) for _ in range(8)]
    gm, how = fxpress_quantize(model, (x,), calib)
    return gm, how


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune-seconds", type=float, default=600)
    ap.add_argument("--int8-tune-seconds", type=float, default=300)
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-untuned", action="store_true")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--resnet18", action="store_true",
                    help="TVM fp32 tuned vs int8 tuned on the host and a simulated AVX2 host")
    ap.add_argument("--trials-per-task", type=int, default=4, help="--resnet18: tuning cap per kernel")
    ap.add_argument("--fresh", action="store_true", help="--resnet18: tune into a new temporary cache")
    args = ap.parse_args()
    if args.resnet18:
        return compare(args)
    torch.set_num_threads(args.threads)
    cache = args.cache or tempfile.mkdtemp(prefix="fxpress-tvm-bench-")
    model = resnet18()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    gm = fxpress.capture(model, (x,))
    with torch.no_grad():
        ref = gm(x)
    rows = []

    def row(name, fn, extra=""):
        with torch.no_grad():
            out = torch.as_tensor(fn(x))
            err = (out - ref).abs().max().item()
        rows.append((name, fn, err, extra))
        print(f"  {name}: max err {err:.1e}; {extra}", file=sys.stderr, flush=True)

    row("ORT fp32", ort_fp32(model, x, args.threads))
    row("eager fp32", lambda t: gm(t))
    if not args.skip_untuned:
        run = compile_tvm(gm, (x,))
        row("TVM fp32 untuned", run, f"compile {run.report['compile_s']} s; parallel loops {run.report['parallel']}")
        static = _VMRunner(run.executable, tvm.cpu(0), "cpu")  # same kernels, TVM's own launcher
        row("TVM fp32 untuned, TVM's static split", lambda t: static.run_flat([t])[0],
            "same executable, in-memory, TVMBackendParallelLaunch")
    opts = TuneOptions(trials=args.trials, time_budget_s=args.tune_seconds, cache_dir=cache)
    run = compile_tvm(gm, (x,), tune=opts)
    t = run.report["tuning"]
    row("TVM fp32 tuned", run, f"tuned {t['seconds']} s, {t['trials']} trials, "
        f"{t['tasks_tuned']}/{t['tasks']} tasks")
    t0 = time.perf_counter()
    again = compile_tvm(gm, (x,), tune=opts)
    t = again.report["tuning"]
    row("TVM fp32 tuned (2nd compile, cached db)", again,
        f"cached={t['cached']}, tuning {t['seconds']} s, compile {time.perf_counter() - t0:.1f} s")
    if args.int8_tune_seconds > 0:
        qgm, how = quantize_fxpress(model, x)
        with torch.no_grad():
            qref = qgm(x)
        opts8 = TuneOptions(trials=args.trials, time_budget_s=args.int8_tune_seconds, cache_dir=cache)
        run8 = compile_tvm(qgm, (x,), tune=opts8)
        t = run8.report["tuning"]
        low = run8.report["lowering"]
        with torch.no_grad():
            qerr = (run8(x) - qref).abs().max().item()
        row(f"TVM int8 tuned ({how})", run8, f"tuned {t['seconds']} s, {t['trials']} trials; "
            f"{low}; int8 intrinsics {_intrinsics(run8)}; max|TVM-IR| {qerr:.2e}")
    stats = interleaved_ms([fn for _, fn, _, _ in rows], x, args.rounds)
    base = stats[0][0]
    from fxpress import hw
    from fxpress.backends.tvm import host_target
    print(f"\nResNet-18, batch 1, 224x224, {args.threads} threads; {args.rounds} interleaved rounds x 5 calls")
    print(f"host: {hw.host().int8_ceiling_note()}; TVM target {host_target()}")
    print("\n| runner | median ms | p10-p90 ms | latency / ORT fp32 | max abs err vs IR fp32 | notes |\n"
          "| --- | ---: | ---: | ---: | --- | --- |")
    for (name, _, err, extra), (med, p10, p90) in zip(rows, stats):
        print(f"| {name} | {med:.1f} | {p10:.1f}-{p90:.1f} | {med / base:.2f} | {err:.1e} | {extra} |")


# An AVX2 + FMA x86 host without AVX-512 or VNNI (the znver3 VM of shared/NOTES.md): its
# kernels run here too, this CPU has every instruction they use.
AVX2_HOST = {"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "movbe"}


def kernel_ms(executable, x, runs: int = 10) -> list[tuple[str, float]]:
    """(kernel, median ms) of every conv/matmul call of one VM run, in call order.

    TVM's VM instrument hook times each call (TVM's own static parallel split, in-process)."""
    from tvm import relax
    vm = relax.VirtualMachine(executable, tvm.cpu(0))
    arg = tvm.runtime.from_dlpack(x.contiguous())
    samples: dict[int, list[float]] = {}
    names: dict[int, str] = {}
    state = {"i": 0, "t": 0.0}

    def instrument(func, symbol, before, ret, *a):
        if before:
            state["t"] = time.perf_counter()
        elif "conv2d" in symbol or "matmul" in symbol:
            names[state["i"]] = symbol
            samples.setdefault(state["i"], []).append((time.perf_counter() - state["t"]) * 1e3)
            state["i"] += 1
        return 0

    vm.set_instrument(instrument)
    for _ in range(runs + 1):
        state["i"] = 0
        vm["main"](arg)
    return [(names[i], statistics.median(v[1:])) for i, v in sorted(samples.items())]


def _tuning(run) -> str:
    t = run.report.get("tuning", {})
    if t.get("cached"):
        return "cached database (0 trials now)"
    return (f"{t.get('trials', 0)} trials, {t.get('seconds', 0)} s, "
            f"{t.get('tasks_tuned', 0)}/{t.get('tasks', 0)} kernels")


def compare(args) -> None:
    """TVM fp32 tuned vs TVM int8 tuned, host and simulated AVX2, ORT fp32 the reference."""
    import contextlib

    from fxpress import hw
    from fxpress.backends.tvm.tune import cache_root
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    cache = tempfile.mkdtemp(prefix="fxpress-tvm-bench-") if args.fresh else str(cache_root(args.cache))
    model = resnet18()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    opts = TuneOptions(trials=args.trials, time_budget_s=args.tune_seconds, trials_per_task=args.trials_per_task,
                       cache_dir=cache)
    rows = [("ORT fp32", "host", ort_fp32(model, x, args.threads), "", "")]
    layers = {}
    hosts = [("host", contextlib.nullcontext),
             ("simulated AVX2", lambda: hw.simulate(flags=AVX2_HOST, cpu_name="znver3"))]
    for where, ctx in hosts:
        with ctx():
            isa = hw.host().feature_key()
            gm = fxpress.capture(model, (x,))
            qgm, how = quantize_fxpress(model, x)  # weight forms for this ISA (fxpress.hw)
            t0 = time.perf_counter()
            f32 = compile_tvm(gm, (x,), tune=opts)
            f32_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            i8 = compile_tvm(qgm, (x,), tune=opts)
            i8_s = time.perf_counter() - t0
        with torch.no_grad():
            step = max(n.args[1] for n in qgm.graph.nodes
                       if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default)
            err = (i8(x) - qgm(x)).abs().max().item()
            err32 = (f32(x) - gm(x)).abs().max().item()
        rows.append(("TVM fp32 tuned", where, f32, _tuning(f32), f"compile {f32_s:.0f} s; max|TVM-IR| {err32:.1e}"))
        rows.append((f"TVM int8 tuned ({how})", where, i8, _tuning(i8),
                     (f"compile {i8_s:.0f} s; {i8.report['lowering']}; intrinsics {_intrinsics(i8)}; "
                      f"max|TVM-IR| {err:.1e} = {err / step:.2f} quantization steps")))
        print(f"  {where} ({isa}): fp32 {rows[-2][3]}; int8 {rows[-1][3]}", file=sys.stderr, flush=True)
        layers[where] = (kernel_ms(f32.executable, x), kernel_ms(i8.executable, x))
    stats = interleaved_ms([r[2] for r in rows], x, args.rounds)
    load1 = os.getloadavg()
    base = stats[0][0]
    host = hw.host()
    flags = " ".join(sorted(f for f in host.flags if f.startswith(("avx", "amx", "fma"))))
    print(f"\nResNet-18, batch 1, 224x224, {args.threads} threads; up to {args.rounds} interleaved rounds x 5 calls; "
          f"tuning budget {args.trials_per_task} trials per kernel (template tiles nearest the default, "
          f"then MetaSchedule search), <= {args.trials} per graph, <= {args.tune_seconds:.0f} s per graph; "
          f"database {cache}")
    print(f"host: {host.feature_key()}; flags {flags}; {host.int8_ceiling_note()}")
    print(f"simulated AVX2: {sorted(AVX2_HOST)} (kernels built for it, run on this host)")
    print(f"load average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f}\n")
    print("| runner | ISA | median ms | p10-p90 ms | x ORT fp32 | int8 / fp32 same ISA | tuning | notes |\n"
          "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for k, ((name, where, _, tuning, note), (med, p10, p90)) in enumerate(zip(rows, stats)):
        speed = f"{stats[k - 1][0] / med:.2f}" if "int8" in name else ""
        print(f"| {name} | {where} | {med:.1f} | {p10:.1f}-{p90:.1f} | {base / med:.2f} | {speed} | {tuning} | {note} |")
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    print("\nPer layer (TVM VM instrument, median of 10 runs, TVM's static parallel split; ms)\n")
    print("| layer | " + " | ".join(f"{w} fp32 | {w} int8 | {w} x" for w in layers) + " |")
    print("| --- |" + " ---: |" * (3 * len(layers)))
    for i, name in enumerate(names):
        cells = []
        for f, q in layers.values():
            if i < len(f) and i < len(q):
                cells.append(f"{f[i][1]:.3f} | {q[i][1]:.3f} | {f[i][1] / q[i][1]:.2f}")
            else:
                cells.append("- | - | -")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for where, (f, q) in layers.items():
        print(f"{where}: conv+fc kernels fp32 {sum(v for _, v in f):.1f} ms, int8 {sum(v for _, v in q):.1f} ms")


def _intrinsics(run) -> str:
    """Which int8 dot-product intrinsics the conv templates used (none: LLVM's int32 code)."""
    used = {k.split(":", 1)[1]: v for k, v in run.report["schedules"].items() if k.startswith("int8_intrinsic:")}
    return ", ".join(f"{k} x{v}" for k, v in used.items()) or "none"


if __name__ == "__main__":
    main()
