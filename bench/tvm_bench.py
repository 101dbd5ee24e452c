"""ResNet-18 (batch 1, 224x224, random weights) on TVM: untuned, tuned fp32, tuned int8, vs ORT fp32.

    .venv/bin/python bench/tvm_bench.py --tune-seconds 600 --int8-tune-seconds 300

Tuning records go to --cache (default: a fresh temporary directory, so the first compile
really tunes); the script then compiles the fp32 graph again to show the cached database
is re-used (zero tuning seconds). Prints one markdown table of median latencies.
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

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import fxpress  # noqa: E402
from fxpress.backends.tvm import TuneOptions, compile_tvm  # noqa: E402
from tests.models import resnet18  # noqa: E402


def median_ms(fn, x, warmup: int = 3, runs: int = 20, max_s: float = 30.0) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    t_end = time.perf_counter() + max_s
    while len(times) < runs and (len(times) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ort_fp32(model, x, threads: int):
    import onnxruntime as ort
    path = Path(tempfile.mkdtemp()) / "r18.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: sess.run(None, {name: t.numpy()})[0]


def quantize_pt2e(gm, x):
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, q)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        prepared(torch.randn(x.shape, generator=g))
    return convert_pt2e(prepared)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune-seconds", type=float, default=600)
    ap.add_argument("--int8-tune-seconds", type=float, default=300)
    ap.add_argument("--trials", type=int, default=4000)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-untuned", action="store_true")
    args = ap.parse_args()
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
            out = fn(x)
            out = torch.as_tensor(out)
            err = (out - ref).abs().max().item()
            rows.append((name, median_ms(fn, x), err, extra))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)

    row("ORT fp32", ort_fp32(model, x, args.threads))
    row("eager fp32", lambda t: gm(t))
    if not args.skip_untuned:
        run = compile_tvm(gm, (x,))
        row("TVM fp32 untuned", run, f"compile {run.report['compile_s']} s")
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
        qgm = quantize_pt2e(gm, x)
        with torch.no_grad():
            qref = qgm(x)
        opts8 = TuneOptions(trials=args.trials, time_budget_s=args.int8_tune_seconds, cache_dir=cache)
        run8 = compile_tvm(qgm, (x,), tune=opts8)
        t = run8.report["tuning"]
        low = run8.report["lowering"]
        with torch.no_grad():
            qerr = (run8(x) - qref).abs().max().item()
        row("TVM int8 tuned (PT2E graph)", run8, f"tuned {t['seconds']} s, {t['trials']} trials; "
            f"{low}; max|TVM-IR| {qerr:.2e}")
    print("\n| runner | median ms | max abs err vs IR fp32 | notes |\n| --- | --- | --- | --- |")
    for name, ms, err, extra in rows:
        print(f"| {name} | {ms:.1f} | {err:.1e} | {extra} |")


if __name__ == "__main__":
    main()
