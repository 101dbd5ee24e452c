"""Side-by-side bench: fxpress (-> ORT, -> Inductor) and the peers, in one process.

    python bench/run.py --target cpu [--workloads resnet18,minilm] [--rounds 20]

Every runner of a workload is built first, then timed in interleaved rounds (each round runs
every runner once, in a rotated order), so load changes on a shared machine hit all runners
alike. Reported: median latency over rounds, ratio vs ORT fp32, accuracy (top-1 agreement with
fp32 for CNNs; cosine of sentence embeddings for MiniLM: mean and min over all sentences),
artefact size. Writes bench/out/<target>.json, .md and a latency-vs-accuracy Pareto PNG.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from bench.models import WORKLOADS, get_workload  # noqa: E402
from bench.peers import PEERS, fxpress_quantize  # noqa: E402
from fxpress.utils import atomic_write, atomic_write_text  # noqa: E402


def _fxpress_runners(w, tmp):
    """fxpress int8: quantized IR lowered to ORT and to Inductor."""
    import fxpress
    from fxpress.errors import LoweringError
    dynamic = w.kind == "text"
    gm, how = fxpress_quantize(w.model, w.example, w.calibration, dynamic=dynamic, text=dynamic)
    out = []
    from bench.peers import THREADS
    ort_run = fxpress.lower(gm, "onnxruntime", example_inputs=w.example, calibration=w.calibration,
                            threads=THREADS)
    path = os.path.join(tmp, f"{w.name}_fxpress.onnx")
    try:
        ort_run.save(path)
        size = os.path.getsize(path)
    except LoweringError:  # runs as ORT partitions + PyTorch fallback nodes: no single .onnx
        size = _int8_size(gm)
        ort_how = how + ", ORT partitions + torch fallback"
    else:
        ort_how = how
    out.append((f"fxpress -> ORT ({ort_how})", ort_run, size, ort_run.report.get("kernels")))
    from fxpress import hw
    if not (hw.host().vnni or hw.host().amx_int8):
        # without VNNI, full-range int8 weights run as exact (slower) u8 x u8 kernels; the
        # peers' s8 weights saturate int16 pair sums there. reduce_range weights ([-64, 64])
        # run as s8 at full speed and stay exact.
        gm7, how7 = fxpress_quantize(w.model, w.example, w.calibration, dynamic=dynamic,
                                     reduce_range=True, text=dynamic)
        s8 = fxpress.lower(gm7, "onnxruntime", example_inputs=w.example, calibration=w.calibration,
                           threads=THREADS)
        out.append((f"fxpress -> ORT reduce_range s8 ({how7})", s8, out[0][2],
                    s8.report.get("kernels")))
    ind = fxpress.lower(gm, "inductor", example_inputs=w.example)
    out.append((f"fxpress -> Inductor ({how})", ind, _int8_size(gm), ind.report.get("kernels")))
    return out


def _int8_size(gm) -> int:
    return sum(t.numel() * t.element_size() for t in list(gm.parameters()) + list(gm.buffers()))


def _accuracy(w, fn, ref_outputs):
    """CNN: top-1 agreement with fp32 (%); text: (mean, min) cosine of embeddings."""
    outs = [fn(*b) for b in w.evaluation]
    if w.kind == "text":
        cos = torch.cat([torch.nn.functional.cosine_similarity(o.float(), r.float(), dim=-1)
                         for o, r in zip(outs, ref_outputs)])
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
    agree = [float((o.argmax(-1) == r.argmax(-1)).float().mean()) for o, r in zip(outs, ref_outputs)]
    cos = torch.cat([torch.nn.functional.cosine_similarity(o.float(), r.float(), dim=-1)
                     for o, r in zip(outs, ref_outputs)])
    return {"top1_agree": 100 * sum(agree) / len(agree), "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min())}


def bench_workload(w, rounds: int, warmup: int) -> list[dict]:
    with torch.no_grad():
        ref = [w.model(*b) for b in w.evaluation]
    runners = []
    with tempfile.TemporaryDirectory() as tmp:
        for peer in PEERS:
            if peer.kind == "static" and w.kind == "text":
                continue
            if peer.kind == "dynamic" and w.kind != "text":
                continue
            t0 = time.time()
            try:
                fn, size = peer.build(w, tmp)
                runners.append({"runner": peer.name, "fn": fn, "size": size, "kernels": None})
                print(f"  built {peer.name} ({time.time() - t0:.0f}s)", flush=True)
            except Exception as e:
                print(f"  {peer.name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                traceback.print_exc(limit=2)
        t0 = time.time()
        try:
            for name, fn, size, kernels in _fxpress_runners(w, tmp):
                runners.append({"runner": name, "fn": fn, "size": size, "kernels": kernels})
            print(f"  built fxpress runners ({time.time() - t0:.0f}s)", flush=True)
        except Exception as e:
            print(f"  fxpress: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc()
    with torch.no_grad():
        for r in runners:
            r.update(_accuracy(w, r["fn"], ref))
            for _ in range(warmup):
                r["fn"](*w.example)
        times = {r["runner"]: [] for r in runners}
        for i in range(rounds):  # interleaved, rotated: contention is shared by every runner
            order = runners[i % len(runners):] + runners[:i % len(runners)]
            for r in order:
                t = time.perf_counter()
                r["fn"](*w.example)
                times[r["runner"]].append(time.perf_counter() - t)
    base = None
    rows = []
    for r in runners:
        med = 1e3 * statistics.median(times[r["runner"]])
        if r["runner"] == "ORT fp32":
            base = med
        rows.append({k: v for k, v in r.items() if k != "fn"} | {
            "workload": w.name, "median_ms": med, "p10_ms": 1e3 * _pct(times[r["runner"]], 10),
            "p90_ms": 1e3 * _pct(times[r["runner"]], 90), "rounds": rounds})
    for row in rows:
        row["speedup_vs_ort_fp32"] = (base / row["median_ms"]) if base else None
    return rows


def _pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# fxpress bench ({meta['target']}, {meta['cpu']}, {meta['threads']} threads, "
             f"{meta['rounds']} interleaved rounds, load avg at start {meta['load']})", ""]
    lines.append("| workload | runner | median ms | p10–p90 ms | × vs ORT fp32 | accuracy | size MB |")
    lines.append("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        if "top1_agree" in r:
            acc = f"top-1 agree {r['top1_agree']:.1f}%, cos {r['cos_mean']:.4f}"
        else:
            acc = f"cos mean {r['cos_mean']:.4f} min {r['cos_min']:.4f}"
        sp = f"{r['speedup_vs_ort_fp32']:.2f}" if r.get("speedup_vs_ort_fp32") else "–"
        lines.append(f"| {r['workload']} | {r['runner']} | {r['median_ms']:.1f} | "
                     f"{r['p10_ms']:.1f}–{r['p90_ms']:.1f} | {sp} | {acc} | {r['size'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def pareto_png(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", flush=True)
        return
    names = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, wname in zip(axes[0], names):
        for r in (r for r in rows if r["workload"] == wname):
            acc = r.get("cos_min") if "top1_agree" not in r else r["top1_agree"] / 100
            ax.scatter(r["median_ms"], acc, s=40, marker="*" if "fxpress" in r["runner"] else "o")
            ax.annotate(r["runner"].split(" (")[0], (r["median_ms"], acc), fontsize=7)
        ax.set_xlabel("median latency (ms)")
        ax.set_ylabel("top-1 agreement" if wname != "minilm" else "min cosine vs fp32")
        ax.set_title(wname)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(_ROOT / "bench" / "out"))
    a = ap.parse_args(argv)
    if a.target == "cuda" and not torch.cuda.is_available():
        print("--target cuda: no CUDA device here; nothing to run (skipped)")
        return 0
    if a.target == "cuda":
        print("--target cuda: the CUDA peers are not part of this harness yet (skipped)")
        return 0
    from fxpress.backends.onnxruntime import physical_cores
    threads = a.threads or physical_cores()
    torch.set_num_threads(threads)
    import bench.peers
    bench.peers.THREADS = threads
    meta = {"target": a.target, "threads": threads, "rounds": a.rounds,
            "cpu": _cpu_name(), "isa": _isa(), "load": f"{os.getloadavg()[0]:.1f}", "torch": torch.__version__}
    rows: list[dict] = []
    out = Path(a.out)
    for name in [n.strip() for n in a.workloads.split(",") if n.strip()]:
        print(f"== {name}", flush=True)
        rows += bench_workload(get_workload(name), a.rounds, a.warmup)
        atomic_write_text(out / f"{a.target}.json", json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                               default=str))
    table = markdown(rows, meta)
    print(table)
    atomic_write_text(out / f"{a.target}.md", table)
    pareto_png(rows, out / f"{a.target}_pareto.png")
    return 0


def _cpu_name() -> str:
    """A label only (decisions use fxpress.hw's features)."""
    from fxpress import hw
    return hw.host().model or hw.host().cpu_name or platform.processor() or hw.host().arch


def _isa() -> str:
    """The host ISA and its int8/fp32 ceiling, from fxpress.hw's features."""
    from fxpress import hw
    return hw.host().int8_ceiling_note()


if __name__ == "__main__":
    sys.exit(main())
