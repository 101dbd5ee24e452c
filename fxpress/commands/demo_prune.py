"""The demo's pruned + int8 model: channel pruning, recovery from the fp32 teacher, static int8.

One ``fxpress.compress`` call: ``ChannelPruning`` removes channels, its ``finetune`` hook
recovers the pruned float graph (optional BN re-estimation on data; a least-squares refit of the
1x1 convs that read pruned channels to the unpruned model's outputs, passes/prune/reconstruct.py;
then optionally offline distillation from the unpruned fp32 model: KD on the logits plus FitNets
hints on block outputs whose width pruning kept), and ``Quantize(mode="static")`` calibrates
the recovered graph:

    cm = pruned_int8(model, (x,), calibration=calib, train=train, bn=None, ratio=0.5,
                     caps=EFFNET_CAPS, round_to=16, refit=EFFNET_REFIT, steps=0)

On EfficientNet-Lite0 the refit is what recovers (50 % of blocks 6-15: 1 % -> 67 % top-1
agreement); distillation after it on crops of three photos lowered agreement (67 % -> 47-62 %,
80 steps; docs/results/session9_prune.md), so the demo runs the refit alone.

With ``steps=0`` nothing is trained (only the BN statistics are re-estimated where `bn` is
given): the baseline the recovery is measured against (tests/core/test_demo_prune.py).
On EfficientNet-Lite0 with crops of three photos, BN re-estimation is left out: statistics of
three scenes are not ImageNet's (measured at ratio 0.25, under load, not a controlled
comparison: 60 steps at lr 2e-3 after it reached 43 % top-1 agreement, 40 steps at lr 1e-3
without it 50 %).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["EFFNET_CAPS", "EFFNET_HINTS", "EFFNET_REFIT", "pruned_int8", "recovery"]

# EfficientNet-Lite0: prune the expansion channels of blocks 3-15 (28x28 and below); the stem,
# the first three blocks (112x112 and 56x56; measured: 25-50 % of one early block's expansion
# channels alone drops top-1 agreement to 19-55 % without recovery), the residual streams (the
# project convs) and the head stay whole. Keep the kept counts multiples of 16 (round_to=16):
# ORT's int8 depthwise QLinearConv runs 2-2.7x slower on a channel count that is not one (one
# 3x3 14x14 conv, one thread: 504 channels 78 us, 672 channels 41 us, 496 channels 29 us;
# docs/results/session9_prune.md)
EFFNET_CAPS = {"_conv_stem": 0.0, "_blocks.[0-2]._*": 0.0, "_blocks.*._project_conv": 0.0,
               "_conv_head": 0.0}
# block outputs (widths unchanged by the caps above): identity hint adapters
EFFNET_HINTS = ("_blocks.7", "_blocks.10", "_blocks.13", "_blocks.15")
# the 1x1 projections that read the pruned channels: refit by least squares after pruning
EFFNET_REFIT = tuple(f"_blocks.{i}._project_conv" for i in range(3, 16))


def recovery(teacher: torch.nn.Module, train: Sequence, bn: Sequence | None, *, steps: int,
             lr: float = 1e-3, temperature: float = 2.0, hints: Sequence[str] = (),
             hint_weight: float = 1.0, refit: Sequence[str] = (), refit_data: Sequence | None = None,
             log: dict | None = None):
    """finetune(gm) for compress(): re-estimate BN on `bn` (when given), refit the 1x1 convs
    `refit` to the teacher by least squares on `refit_data` (default `train`), then (steps > 0)
    distil from `teacher` on `train` for `steps` optimiser steps. `log` (a dict) receives what
    each stage did."""
    from ..distill import offline
    from ..passes.prune.bn_recal import recalibrate_bn
    from ..passes.prune.reconstruct import reconstruct

    def finetune(module: Any) -> dict:
        gm = getattr(module, "graph_module", module)
        out = {"bn": recalibrate_bn(gm, bn)} if bn is not None else {}
        if refit:
            st = reconstruct(gm, teacher, train if refit_data is None else refit_data, refit)
            out["refit"] = {"convs": len(st),
                            "err_before": round(sum(v["err_before"] for v in st.values()) / len(st), 4),
                            "err_after": round(sum(v["err_after"] for v in st.values()) / len(st), 4)}
        if steps > 0:
            ft = offline(teacher, train, epochs=10_000, max_steps=steps, lr=lr,
                         temperature=temperature, hints=hints, hint_weight=hint_weight)
            h = ft(gm)["history"]
            out["distill"] = {"steps": steps, "loss_first": h[0]["loss"], "loss_last": h[-1]["loss"]}
        if log is not None:
            log.update(out)
        return out
    return finetune


def pruned_int8(model: torch.nn.Module, example: tuple, *, calibration: Sequence, train: Sequence,
                bn: Sequence | None, ratio: float, caps: dict | None = None,
                hints: Sequence[str] = (), steps: int = 60, lr: float = 1e-3, temperature: float = 2.0,
                importance: str = "taylor", round_to: int = 8, refit: Sequence[str] = (),
                quantize: bool = True, log: dict | None = None):
    """`model` pruned (local ranking, `ratio` of each uncapped group), recovered, static int8.

    Taylor importance (|w * dL/dw| on the calibration batches) by default: on EfficientNet-Lite0
    at 25 % of blocks 6-15's expansion channels it keeps 58 % top-1 agreement before any
    training where L2 keeps 0 % (docs/results/session8_demo.md)."""
    import fxpress
    recipe = [fxpress.ChannelPruning(ratio=ratio, scope="local", caps=caps, importance=importance,
                                     round_to=round_to)]
    if quantize:
        recipe.append(fxpress.Quantize(mode="static"))
    ft = recovery(model, train, bn, steps=steps, lr=lr, temperature=temperature, hints=hints,
                  refit=refit, log=log)
    return fxpress.compress(model, example, recipe, calibration=calibration, finetune=ft)


def main(argv: Sequence[str] | None = None) -> int:
    """A/B of the demo's pruned row against the unpruned int8 model on ONNX Runtime, one process:

        python -m fxpress.commands.demo_prune --ratios 0.35 0.5 --rounds 60

    Prints each pruned model's MACs and top-1 agreement with fp32 on the demo's held-out crops,
    then interleaved medians (batch 1) and the speed-up over unpruned int8."""
    import argparse
    import time

    import fxpress

    from ..passes.analysis.cost import total_cost
    from ..real import agreement, efficientnet_lite0, photo_sets, photo_train
    from ..timing import interleaved_medians
    p = argparse.ArgumentParser(prog="python -m fxpress.commands.demo_prune")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--no-refit", action="store_true", help="prune only (speed is the same)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = efficientnet_lite0()
    calib, ev = photo_sets(32, 96)
    batches = [(calib[i:i + 8],) for i in range(0, 32, 8)]
    train = photo_train(128, 224, seed=1)
    example = (ev[:1],)
    with torch.no_grad():
        ref = model(ev).argmax(-1)
    runs = {"int8": fxpress.lower(fxpress.compress(model, example, fxpress.Quantize(mode="static"),
                                                   calibration=batches), "onnxruntime", spinning=False)}
    for r in args.ratios:
        t = time.perf_counter()
        cm = pruned_int8(model, example, calibration=batches, bn=None, ratio=r, caps=EFFNET_CAPS,
                         train=[(train[i:i + 16],) for i in range(0, 128, 16)], round_to=16,
                         refit=() if args.no_refit else EFFNET_REFIT, steps=0)
        run = fxpress.lower(cm, "onnxruntime", spinning=False)
        got = torch.cat([torch.as_tensor(run(ev[i:i + 16])) for i in range(0, len(ev), 16)])
        print(f"pruned {r:.0%}: MACs {total_cost(cm.graph_module).macs / 1e6:.1f}M, top-1 agreement "
              f"{agreement(ref, got.argmax(-1)):.3f}, built in {time.perf_counter() - t:.0f} s", flush=True)
        runs[f"pruned {r:.0%}"] = run
    ms = interleaved_medians(runs, example, rounds=args.rounds, warmup=3)
    for k, v in ms.items():
        print(f"{k:12s} {v:.3f} ms  {ms['int8'] / v:.3f}x the unpruned int8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
