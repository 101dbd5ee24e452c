"""Structured pruning bench: fxpress.ChannelPruning vs Torch-Pruning on ResNet-18.

For each ratio, both prune the same model (global ranking, L2 group importance,
round_to=8, classifier outputs kept), then each result is measured the same way:
MACs (fxpress's cost analysis over the captured graph, so both are counted alike) and
median latency, batch 1 at 224x224, on Inductor (fxpress.lower, freezing) and on ONNX
Runtime (torch.onnx.export dynamo -> ORT, all graph optimizations).

    python bench/prune.py                       # ratios 0.3 0.5 0.7, both backends
    python bench/prune.py --ratios 0.5 --backends ort --runs 30
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fxpress  # noqa: E402
from fxpress.passes.analysis.cost import total_cost  # noqa: E402
from fxpress.passes.analysis.shape_prop import propagate_shapes  # noqa: E402
from tests.models import resnet18, resnet50  # noqa: E402


def macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    gm = module.graph_module if isinstance(module, fxpress.CompressedModel) else fxpress.capture(module, (x,))
    propagate_shapes(gm, (x,))
    return total_cost(gm).macs


def ort_callable(module: torch.nn.Module, x: torch.Tensor):
    import onnxruntime as ort
    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    torch.onnx.export(module, (x,), dynamo=True, verbose=False).save(path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: sess.run(None, {name: t.numpy()})


def inductor_callable(module: torch.nn.Module, x: torch.Tensor):
    return fxpress.lower(module, backend="inductor", example_inputs=(x,))


def torch_pruning(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp
    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(m, (x,), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=True, round_to=8,
                                  ignored_layers=[m.fc])
    pruner.step()
    return m.eval()


def fxpress_prune(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> fxpress.CompressedModel:
    return fxpress.compress(model, (x,), fxpress.ChannelPruning(ratio=ratio, importance="l2",
                                                               scope="global", round_to=8))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--backends", nargs="+", default=["inductor", "ort"], choices=["inductor", "ort"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    # dependency analysis time on ResNet-50 (the issue's < 2 s budget)
    from fxpress.passes.analysis.dependency import analyze
    gm50 = fxpress.capture(resnet50(), (torch.randn(1, 3, args.size, args.size),))
    analyze(gm50)
    t0 = time.perf_counter()
    dep50 = analyze(gm50)
    print(f"dependency analysis, ResNet-50: {time.perf_counter() - t0:.3f} s, {len(dep50.groups)} groups")

    model = resnet18().eval()
    x = torch.randn(1, 3, args.size, args.size)
    y_ref = model(x)
    entries = [("unpruned", 0.0, model, 0.0)]
    for r in args.ratios:
        t0 = time.perf_counter()
        tp_model = torch_pruning(model, x, r)
        entries.append(("torch-pruning", r, tp_model, time.perf_counter() - t0))
        t0 = time.perf_counter()
        cm = fxpress_prune(model, x, r)
        entries.append(("fxpress", r, cm, time.perf_counter() - t0))
        assert cm(x).shape == y_ref.shape
    rows = [{"method": m, "ratio": r, "macs": macs(mod, x), "prune_s": s} for m, r, mod, s in entries]
    # build every runner first, then time them interleaved (round-robin), so that load
    # changes on a shared machine hit all of them alike
    runners = {b: [inductor_callable(mod, x) if b == "inductor" else ort_callable(mod, x)
                   for _, _, mod, _ in entries] for b in args.backends}
    samples = {b: [[] for _ in entries] for b in args.backends}
    with torch.no_grad():
        for b in args.backends:
            for fn in runners[b]:
                for _ in range(3):
                    fn(x)
        for k in range(args.runs):
            for b in args.backends:
                order = list(enumerate(runners[b]))
                for i, fn in (order if k % 2 == 0 else order[::-1]):  # no fixed position in a round
                    t0 = time.perf_counter()
                    fn(x)
                    samples[b][i].append((time.perf_counter() - t0) * 1e3)
    for b in args.backends:
        for i, row in enumerate(rows):
            row[b] = statistics.median(samples[b][i])

    base = rows[0]
    head = "| method | ratio | GMACs | MACs vs unpruned |"
    head += "".join(f" {b} ms | {b} speed-up |" for b in args.backends) + " prune s |"
    print("\nResNet-18, batch 1, %dx%d, %d threads, median of %d interleaved runs" %
          (args.size, args.size, torch.get_num_threads(), args.runs))
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        line = f"| {r['method']} | {r['ratio']:.1f} | {r['macs'] / 1e9:.3f} | {r['macs'] / base['macs']:.3f} |"
        for b in args.backends:
            line += f" {r[b]:.2f} | {base[b] / r[b]:.2f}x |"
        line += f" {r['prune_s']:.1f} |"
        print(line)


if __name__ == "__main__":
    main()
