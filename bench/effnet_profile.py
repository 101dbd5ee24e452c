"""Per-op profile of int8 CNNs (EfficientNet-Lite0, ResNet-18): fxpress -> ORT and fxpress ->
Inductor against ORT quantize_static and OpenVINO + NNCF (issue 24: where the time goes).

    .venv/bin/python bench/effnet_profile.py [--workload efficientnet_lite0|resnet18] [--runs 200]
        [--recipe bench|default] [--threads 2] [--no-openvino] [--no-inductor]

Each runner alone, one after another in one process: a warm-up, then `--runs` calls with ORT's
profiler, OpenVINO's PERF_COUNT or torch.profiler (Inductor: its extern kernels - the packed
oneDNN convs, pools - and its own fused kernels as one "CompiledFxGraph" self time) on; per op
type: total ms per call, node count; OpenVINO also per layer; the runner's median wall ms from a
separate unprofiled loop. Writes bench/out/effnet_profile.md (EfficientNet-Lite0) or
bench/out/<workload>_profile.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from bench.models import get_workload  # noqa: E402
from bench.peers import export_onnx, fxpress_quantize  # noqa: E402
from fxpress.timing import median_ms  # noqa: E402


def ort_profile(model_bytes: bytes, x, runs: int, threads: int):
    """({op_type: [ms per call, nodes]}, median ms, kernel counts of the optimized graph)."""
    import onnx
    import onnxruntime as ort

    from fxpress.backends.onnxruntime import session_options
    with tempfile.TemporaryDirectory() as tmp:
        opt = os.path.join(tmp, "opt.onnx")
        so = session_options(threads, optimized_path=opt, spinning=False)
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        kernels = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        wall = median_ms(lambda: sess.run(None, feed), (), runs=runs, warmup=5)
        so = session_options(threads, spinning=False)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
        for _ in range(5):
            sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        events = json.load(open(sess.end_profiling()))
    per: dict[str, list] = collections.defaultdict(lambda: [0.0, set()])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per[op][0] += e["dur"] / 1e3
            per[op][1].add(e["name"])
    calls = runs + 5
    return {k: (v[0] / calls, len(v[1])) for k, v in per.items()}, wall, dict(kernels)


def ov_profile(w, runs: int, threads: int, tmp: str):
    import nncf
    import openvino as ov
    src = export_onnx(w.model, w.example, os.path.join(tmp, "ov_src.onnx"), ["x"])
    model = nncf.quantize(ov.convert_model(src),
                          nncf.Dataset([tuple(x.numpy() for x in b) for b in w.calibration]),
                          subset_size=len(w.calibration))
    compiled = ov.Core().compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_NUM_THREADS": threads,
                                                      "PERF_COUNT": True})
    req = compiled.create_infer_request()
    x = w.example[0].numpy()
    wall = median_ms(lambda: req.infer([x]), (), runs=runs, warmup=5)
    per: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    layers: dict[str, list] = collections.defaultdict(list)  # per layer: ms of each run
    for _ in range(runs):
        req.infer([x])
        for p in req.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                k = f"{p.node_type} ({p.exec_type})"
                per[k][0] += p.real_time.total_seconds() * 1e3 / runs
                per[k][1] += 1
                layers[f"{p.node_name} [{k}]"].append(p.real_time.total_seconds() * 1e3)
    return {k: (v[0], v[1] // runs) for k, v in per.items()}, wall, layers


def inductor_profile(gm, w, runs: int):
    """({op: [ms per call, calls per model call]}, median ms, kernel counts) of fxpress ->
    Inductor under torch.profiler; "(Inductor's fused kernels + wrapper)" is the compiled
    graph's self time (its generated C++ kernels: quantize, pads, adds, pools it fused)."""
    import fxpress
    from torch.profiler import ProfilerActivity, profile
    run = fxpress.lower(gm, "inductor", example_inputs=w.example)
    x = w.example
    wall = median_ms(lambda: run(*x), (), runs=runs, warmup=5)
    with torch.no_grad():
        for _ in range(5):
            run(*x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                run(*x)
    per = {}
    for e in prof.key_averages():
        name = "(Inductor's fused kernels + wrapper)" if "CompiledFxGraph" in e.key else e.key
        if e.self_cpu_time_total > 0.005 * 1e3 * runs or "CompiledFxGraph" in e.key:
            per[name] = (e.self_cpu_time_total / 1e3 / runs, e.count // runs)
    return per, wall, run.report.get("kernels", {})


def layer_table(layers: dict, top: int = 25) -> list[str]:
    """The `top` slowest layers (median ms over the profiled runs), in descending order."""
    import statistics
    rows = sorted(((statistics.median(v), k) for k, v in layers.items()), reverse=True)[:top]
    return ["| layer | median ms |", "|---|---:|"] + [f"| {k} | {ms:.3f} |" for ms, k in rows] + [""]


def table(name: str, per: dict, wall: float) -> list[str]:
    total = sum(v[0] for v in per.values())
    lines = [f"### {name}: median {wall:.2f} ms per call (unprofiled); op time {total:.2f} ms", "",
             "| op | nodes | ms per call | share |", "|---|---:|---:|---:|"]
    for k, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {k} | {n} | {ms:.3f} | {100 * ms / total:.1f} % |")
    return lines + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", choices=["bench", "default"], default="bench")
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--workload", default="efficientnet_lite0",
                    choices=["efficientnet_lite0", "resnet18"])
    args = ap.parse_args(argv)
    import fxpress
    from bench.peers import ort_quantize_static
    torch.set_num_threads(args.threads)
    w = get_workload(args.workload)
    x = w.example[0]
    out = [f"# {w.name} int8 per-op profile ({args.threads} threads, {args.runs} runs, "
           f"load avg at start {os.getloadavg()[0]:.1f})", ""]
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        src = export_onnx(w.model, w.example, os.path.join(tmp, "fp32.onnx"), ["x"])
        runners["ORT fp32"] = open(src, "rb").read()
        ort_quantize_static(w.model, w, tmp)
        runners["ORT quantize_static"] = open(os.path.join(tmp, f"{w.name}_qdq.onnx"), "rb").read()
        opts = (w.notes.get("quantize") or {}) if args.recipe == "bench" else {}
        gm, how = fxpress_quantize(w.model, w.example, w.calibration, options=opts)
        run = fxpress.lower(gm, "onnxruntime", example_inputs=w.example, calibration=w.calibration)
        runners[f"fxpress -> ORT ({how})"] = run.onnx_model.SerializeToString()
        for name, blob in runners.items():
            per, wall, kernels = ort_profile(blob, x, args.runs, args.threads)
            out += table(name, per, wall)
            out += ["optimized graph: " + ", ".join(f"{k} {v}" for k, v in sorted(kernels.items())), ""]
            print("\n".join(out[-40:]), flush=True)
        if not args.no_inductor:
            per, wall, kernels = inductor_profile(gm, w, args.runs)
            out += table(f"fxpress -> Inductor ({how})", per, wall)
            out += ["int8 kernels: " + ", ".join(f"{k} {v}" for k, v in sorted(kernels.items())), ""]
            print("\n".join(out[-30:]), flush=True)
        if not args.no_openvino:
            per, wall, layers = ov_profile(w, args.runs, args.threads, tmp)
            out += table("OpenVINO + NNCF nncf.quantize", per, wall)
            out += ["OpenVINO + NNCF, slowest layers:", ""] + layer_table(layers)
    text = "\n".join(out) + "\n"
    name = "effnet_profile.md" if w.name == "efficientnet_lite0" else f"{w.name}_profile.md"
    dst = _ROOT / "bench" / "out" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    from fxpress.utils import atomic_write_text
    atomic_write_text(dst, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
