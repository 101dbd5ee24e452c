"""ResNet-18 with Tucker-2 at 2x fewer MACs: Inductor / ORT latency vs dense, beside TensorLy-Torch.

    python bench/factorize.py [--rounds 30] [--threads 2] [--no-peer]

Ours: fxpress.compress(FoldBatchNorm, LowRank("tucker", budget=0.5, budget_scope="model",
exclude=("conv1", "*.downsample.*"))): the sixteen 3x3 convs shrink so the whole graph halves,
lowered with fxpress.lower(..., "inductor" | "onnxruntime").
Peer: TensorLy-Torch 0.5.0 (`tltorch.FactorizedConv.from_conv(conv, rank=(r_out, r_in, kh, kw),
factorization="tucker", decompose_weights=True)`) on the same BN-folded model, every conv we
factorized replaced at *our* ranks (full rank on the two spatial modes = Tucker-2), in both
of its implementations: "reconstructed" (its default: rebuild the dense kernel every call)
and "factorized" (its own 1x1 -> core -> 1x1 contraction). Peer runs eagerly and through
torch.compile (Inductor); its ONNX export is attempted and any failure is printed.
Latency: batch 1, 224x224, all runners interleaved round by round, median (and min) ms.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxpress  # noqa: E402
from fxpress.passes.analysis.cost import total_cost  # noqa: E402
from fxpress.passes.analysis.shape_prop import propagate_shapes  # noqa: E402
from tests.models import resnet18  # noqa: E402


def fold_bn_eager(model: torch.nn.Module) -> torch.nn.Module:
    """conv -> bn pairs of the ResNet blocks folded in eager mode (the peer gets BN-free convs too)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    m = copy.deepcopy(model).eval()
    pairs = [("conv1", "bn1"), ("conv2", "bn2")]
    for mod in m.modules():
        for c, b in pairs:
            if isinstance(getattr(mod, c, None), torch.nn.Conv2d) and isinstance(getattr(mod, b, None), torch.nn.BatchNorm2d):
                setattr(mod, c, fuse_conv_bn_eval(getattr(mod, c), getattr(mod, b)))
                setattr(mod, b, torch.nn.Identity())
        ds = getattr(mod, "downsample", None)
        if isinstance(ds, torch.nn.Sequential) and len(ds) == 2 and isinstance(ds[1], torch.nn.BatchNorm2d):
            mod.downsample = torch.nn.Sequential(fuse_conv_bn_eval(ds[0], ds[1]))
    return m


def tltorch_peer(folded: torch.nn.Module, ranks: dict[str, tuple[int, int]], implementation: str):
    import tltorch
    m = copy.deepcopy(folded)
    for path, (r_out, r_in) in ranks.items():
        parent_path, _, name = path.rpartition(".")
        parent = m.get_submodule(parent_path) if parent_path else m
        conv = getattr(parent, name)
        kh, kw = conv.kernel_size
        fc = tltorch.FactorizedConv.from_conv(conv, rank=(r_out, r_in, kh, kw), factorization="tucker",
                                              implementation=implementation, decompose_weights=True)
        setattr(parent, name, fc)
    return m.eval()


def ort_session_of(module: torch.nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime as ort
    prog = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(prog.model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda t: torch.from_numpy(sess.run(None, {name: t.numpy()})[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = resnet18(seed=0).eval()
    x = torch.randn(1, 3, 224, 224)

    t0 = time.perf_counter()
    dense_cm = fxpress.compress(model, (x,), [fxpress.FoldBatchNorm()])
    # the 3x3 convs carry the budget: the stem has 3 input channels (nothing to factor on that
    # mode) and Tucker-2 of a 1x1 downsample conv is a plain low-rank product at best
    cm = fxpress.compress(model, (x,), [fxpress.FoldBatchNorm(),
                                        fxpress.LowRank(method="tucker", budget=0.5, budget_scope="model",
                                                        exclude=("conv1", "*.downsample.*"))])
    t_fact = time.perf_counter() - t0
    st = cm.report["lowrank_tucker"]
    propagate_shapes(dense_cm.graph_module, (x,))
    d, f = total_cost(dense_cm.graph_module), total_cost(cm.graph_module)
    print(f"ResNet-18, batch 1, 224x224, {args.threads} threads. Tucker-2 on {st['factorized']} convs "
          f"({len(st['skipped'])} skipped), factorize+capture {t_fact:.1f} s")
    for s in st["skipped"]:
        print(f"  skipped {s}")
    print(f"MACs {d.macs / 1e9:.3f} G -> {f.macs / 1e9:.3f} G ({d.macs / f.macs:.2f}x fewer); "
          f"params {d.params / 1e6:.2f} M -> {f.params / 1e6:.2f} M")
    ranks = {k: v["rank"] for k, v in st["layers"].items()}

    with torch.no_grad():
        ref = model(x)
        runners = {}
        runners["dense Inductor"] = fxpress.lower(dense_cm, backend="inductor", example_inputs=(x,))
        runners["dense ORT"] = fxpress.lower(dense_cm, backend="onnxruntime", example_inputs=(x,),
                                             threads=args.threads)
        runners["fxpress Tucker-2 Inductor"] = fxpress.lower(cm, backend="inductor", example_inputs=(x,))
        runners["fxpress Tucker-2 ORT"] = fxpress.lower(cm, backend="onnxruntime", example_inputs=(x,),
                                                        threads=args.threads)
        notes = {}
        if not args.no_peer:
            folded = fold_bn_eager(model)
            for impl in ("reconstructed", "factorized"):
                peer = tltorch_peer(folded, ranks, impl)
                runners[f"tltorch {impl} eager"] = peer
                try:
                    comp = torch.compile(peer)
                    comp(x)
                    runners[f"tltorch {impl} Inductor"] = comp
                except Exception as e:  # report, do not hide
                    notes[f"tltorch {impl} Inductor"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                try:
                    runners[f"tltorch {impl} ORT"] = ort_session_of(peer, x, args.threads)
                except Exception as e:
                    notes[f"tltorch {impl} ORT"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        errs = {}
        for name, fn in runners.items():
            y = fn(x)
            errs[name] = float((y - ref).norm() / ref.norm())
            for _ in range(3):
                fn(x)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():
                t = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t) * 1e3)
    base = {"Inductor": statistics.median(times["dense Inductor"]), "ORT": statistics.median(times["dense ORT"])}
    print("\n| runner | median ms | min ms | vs dense (same backend) | rel. error vs fp32 model |")
    print("| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        med = statistics.median(ts)
        be = "ORT" if name.endswith("ORT") else "Inductor"
        speed = f"{base[be] / med:.2f}x" if not name.endswith("eager") else "-"
        print(f"| {name} | {med:.2f} | {min(ts):.2f} | {speed} | {errs[name]:.4f} |")
    for k, v in notes.items():
        print(f"| {k} | failed | | | {v} |")


if __name__ == "__main__":
    main()
