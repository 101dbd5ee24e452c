"""MLAS QLinearConv variants on EfficientNet-Lite0's layer shapes, one process, A/B in rounds of
per-runner blocks: which int8 form runs fastest on this CPU (issue 24, session 10).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/effnet_kernels.py [--rounds 12] [--threads 2]

Each runner is one com.microsoft QLinearConv, channels_last (the form ORT's NHWC transformer
gives the int8 graph), batch 1, random int8 data. Variants, against "u8s8 pc" (u8 activations,
s8 per-channel symmetric weights: what fxpress and ORT quantize_static emit):
"u8s8 pc xzp128" (activation zero point 128 instead of 0), "s8s8 pc" (s8 activations),
"u8s8 pt" (per-tensor weight scale), "u8u8 pc" (u8 weights, zero point 128). The stem row
compares the 3-channel 3x3 stride-2 conv with its space-to-depth form (12 channels, 2x2,
stride 1: fxpress/backends/stem.py). Prints "variant: base_ms / variant_ms" (> 1: faster).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = {  # name: (cin, cout, k, hw, group, stride)
    "stem 3->32 3x3 s2 224": (3, 32, 3, 224, 1, 2),
    "pw 96->24 56": (96, 24, 1, 56, 1, 1),
    "pw 24->144 56": (24, 144, 1, 56, 1, 1),
    "pw 480->80 14": (480, 80, 1, 14, 1, 1),
    "pw 192->1152 7": (192, 1152, 1, 7, 1, 1),
    "pw 1152->192 7": (1152, 192, 1, 7, 1, 1),
    "dw 144 3x3 56": (144, 144, 3, 56, 144, 1),
    "dw 240 5x5 28": (240, 240, 5, 28, 240, 1),
    "dw 1152 5x5 7": (1152, 1152, 5, 7, 1152, 1),
}
VARIANTS = {
    "u8s8 pc": {"xdt": "u8", "wdt": "s8"},
    "u8s8 pc xzp128": {"xdt": "u8", "wdt": "s8", "x_zp": 128},
    "s8s8 pc": {"xdt": "s8", "wdt": "s8"},
    "u8s8 pt": {"xdt": "u8", "wdt": "s8", "per_channel": False},
    "u8u8 pc": {"xdt": "u8", "wdt": "u8"},
}


def qlinearconv(cin, cout, k, hw, group, stride, *, xdt, wdt, per_channel=True, x_zp=0,
                threads=2, pad=None, seed=0):
    """A session running one channels-last QLinearConv, and its input: (callable, input)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from fxpress.backends.onnxruntime import session_options
    rng = np.random.default_rng(seed)
    xnp = np.uint8 if xdt == "u8" else np.int8
    w = (rng.integers(-127, 128, size=(cout, cin // group, k, k)).astype(np.int8) if wdt == "s8"
         else rng.integers(0, 256, size=(cout, cin // group, k, k)).astype(np.uint8))
    nsc = cout if per_channel else 1
    wz = np.zeros(nsc, np.int8) if wdt == "s8" else np.full(nsc, 128, np.uint8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(x_zp, xnp), "xz"),
             numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full(nsc, 0.01, np.float32), "ws"),
             numpy_helper.from_array(wz, "wz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
             numpy_helper.from_array(np.array(0, xnp), "yz"),
             numpy_helper.from_array(rng.integers(-1000, 1000, size=cout).astype(np.int32), "b")]
    pads = pad if pad is not None else [k // 2] * 4
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], domain="com.microsoft", channels_last=1, group=group,
                            kernel_shape=[k, k], pads=pads, strides=[stride, stride])
    et = TensorProto.UINT8 if xdt == "u8" else TensorProto.INT8
    ho = (hw + pads[0] + pads[2] - k) // stride + 1
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", et, [1, hw, hw, cin])],
                              [helper.make_tensor_value_info("y", et, [1, ho, ho, cout])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads, spinning=False),
                                providers=["CPUExecutionProvider"])
    lo, hi = (0, 256) if xdt == "u8" else (-128, 128)
    x = rng.integers(lo, hi, size=(1, hw, hw, cin)).astype(xnp)
    return (lambda: sess.run(None, {"x": x})), x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from fxpress.timing import block_medians
    for name, (cin, cout, k, hw, g, st) in LAYERS.items():
        fns = {v: qlinearconv(cin, cout, k, hw, g, st, threads=a.threads, **kw)[0]
               for v, kw in VARIANTS.items()}
        if name.startswith("stem"):  # its space-to-depth form: TF-"same" pads (0, 0, 1, 1)
            fns["space-to-depth 12ch 2x2 s1"] = qlinearconv(
                12, cout, 2, hw // 2, 1, 1, xdt="u8", wdt="s8", threads=a.threads, pad=[0, 0, 1, 1])[0]
        ms = block_medians({v: (lambda f=f: f()) for v, f in fns.items()}, (), rounds=a.rounds,
                           warm=3, timed=10)
        base = ms["u8s8 pc"]
        print(f"{name:24s} u8s8 pc {1e3 * base:7.1f} us | "
              + "  ".join(f"{v}: {base / m:.2f}x" for v, m in ms.items() if v != "u8s8 pc"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
