"""Sharded calibration wall time: ResNet-18 (224², batch 1), 1 process vs N under torchrun.

Each configuration is a fresh torchrun launch (gloo, localhost) that compresses with
``Quantize(mode="static", observer=...)`` on `--batches` calibration images, each rank
calibrating on its round-robin share (fxpress.distributed.shard); rank 0 reports the
calibration pass's time, the whole compress() time and the merged observers' scales.
Configurations are interleaved round by round, so a busy phase of a shared box hits all.

    python bench/distributed.py                     # 1x1, 1x2 threads, 2x1; 16 batches; 3 rounds
    python bench/distributed.py --batches 32 --rounds 5 --observer minmax
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import fxpress
    from fxpress import distributed
    from fxpress.ir.meta import ObserverStats, get_record
    from tests.models import resnet18

    w = distributed.init_from_env()
    torch.set_num_threads(args.threads)
    model = resnet18(num_classes=1000).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 3, 224, 224, generator=g),) for _ in range(args.batches)]
    q = fxpress.Quantize(mode="static", observer=args.observer, calib_batches=args.batches)
    if w is not None:
        dist.barrier()
    t0 = time.perf_counter()
    cm = fxpress.compress(model, data[0], q, calibration=distributed.shard(data, w))
    total = time.perf_counter() - t0
    calib = sum(r.seconds for r in cm.report.passes if r.name == "quant_calibrate")
    scales = [float(rec.scale) for n in cm.graph_module.graph.nodes
              if (rec := get_record(n, ObserverStats)) is not None and rec.scale.numel() == 1]
    if w is None or w.rank == 0:
        Path(args.out).write_text(json.dumps({"calibrate_s": calib, "compress_s": total,
                                              "scales": scales}))
    if w is not None:
        dist.destroy_process_group()


def launch(nproc: int, threads: int, args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", __file__, "--worker", "--threads", str(threads),
           "--batches", str(args.batches), "--observer", args.observer, "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=1800)
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--observer", default="histogram")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    from fxpress.hw import host
    h = host()
    flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
             if getattr(h, f, False)]
    configs = [(1, 1), (1, 2), (2, 1)]       # (processes, threads per process)
    results: dict[tuple, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for nproc, threads in configs:
                res = launch(nproc, threads, args, Path(tmp) / f"{nproc}x{threads}_{r}.json")
                results[(nproc, threads)].append(res)
    base = statistics.median(x["calibrate_s"] for x in results[(1, 1)])
    ref = results[(1, 1)][0]["scales"]
    print(f"ResNet-18 224x224, {args.batches} calibration batches of 1, observer={args.observer}, "
          f"{args.rounds} interleaved rounds; CPU flags {flags}, {os.cpu_count()} cores "
          "(shared box: ratios, not absolute times)")
    print(f"{'procs x threads':>16} {'calibrate s':>12} {'compress s':>11} {'calib speed-up':>15} "
          f"{'max |scale - 1x1| rel':>22}")
    for c in configs:
        cal = statistics.median(x["calibrate_s"] for x in results[c])
        tot = statistics.median(x["compress_s"] for x in results[c])
        dev = max(abs(a - b) / b for a, b in zip(results[c][0]["scales"], ref)) if ref else 0.0
        print(f"{c[0]:>7} x {c[1]:<6} {cal:12.2f} {tot:11.2f} {base / cal:14.2f}x {dev:22.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
