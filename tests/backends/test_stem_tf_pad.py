"""Space-to-depth stems behind TF-"same" padding (EfficientNet-Lite's stem: F.pad(x, (0, 1, 0, 1))
then a 3x3 stride-2 conv on 3 channels): the int8 pad by the zero point is absorbed into the
unshuffle's plan, exactly; an unpadded odd size is still left alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress import hw
from fxpress.backends.base import flat_graph
from fxpress.backends.onnxruntime import compile_onnxruntime
from fxpress.backends.stem import space_to_depth_stems

_PAD = torch.ops.aten.constant_pad_nd.default


class TFStem(nn.Module):
    """TF-"same" stem: pad bottom/right by 1, 3x3 stride-2 conv on RGB, ReLU6, a 1x1 conv."""

    def __init__(self, pad=(0, 1, 0, 1)):
        super().__init__()
        self.pad = pad
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2)
        self.conv2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.conv2(F.relu6(self.conv1(F.pad(x, self.pad))))


def _ir(size: int, pad=(0, 1, 0, 1)):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(2, 3, size, size, generator=g) * 2 - 1,) for _ in range(4)]
    cm = fxpress.compress(TFStem(pad).eval(), data[0], [fxpress.Quantize(mode="static")],
                          calibration=data)
    return cm.graph_module, data


def _pads_before_convs(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == _PAD)


@pytest.mark.parametrize("pad", [(0, 1, 0, 1), (1, 0, 1, 0), (2, 1, 2, 1)])
def test_tf_padded_stem_is_unshuffled_and_exact(pad):
    gm, data = _ir(32, pad)
    f = flat_graph(gm)
    assert _pads_before_convs(f) == 1  # the int8 pad of the quantized input (pads="int8")
    with hw.override(hw.host()):
        assert space_to_depth_stems(f) == 1
    assert _pads_before_convs(f) == 0 or all(  # the old pad is gone; a new one pads the s2d grid
        n.args[0].target == torch.ops.aten.pixel_unshuffle.default
        for n in f.graph.nodes if n.target == _PAD)
    assert sum(1 for n in f.graph.nodes if n.target == torch.ops.aten.pixel_unshuffle.default) == 1
    x = data[1][0]
    ref, got = gm(x), f(x)[0]
    step = float(gm.graph.find_nodes(op="call_function",
                                     target=torch.ops.quantized_decomposed.dequantize_per_tensor.default)[-1].args[1])
    assert (got - ref).abs().max() <= 1.01 * step  # eager float sums in another order: a tie at most
    with hw.override(hw.host()):
        on = compile_onnxruntime(gm, data[0], calibration=data, threads=1)
        off = compile_onnxruntime(gm, data[0], calibration=data, threads=1, space_to_depth=False)
    assert on.report["rewrites"]["space_to_depth_stem"] == 1
    assert on.report["onnx_ops"].get("SpaceToDepth") == 1 and "Pad" not in on.report["onnx_ops"]
    assert on.report["kernels"].get("QLinearConv") == 2 and "Conv" not in on.report["kernels"]
    assert "space_to_depth_stem" not in off.report["rewrites"]
    for xx in (x, torch.rand(3, 3, 32, 32) * 2 - 1):
        np.testing.assert_array_equal(on(xx).numpy(), off(xx).numpy())  # the same int32 sums


def test_odd_unpadded_size_is_left_alone():
    """31 px padded to 32: the unshuffle would need an even unpadded size; nothing rewritten,
    and the ORT lowering still runs the IR's numbers."""
    gm, data = _ir(31)
    f = flat_graph(gm)
    with hw.override(hw.host()):
        assert space_to_depth_stems(f) == 0
        on = compile_onnxruntime(gm, data[0], calibration=data, threads=1)
    assert "space_to_depth_stem" not in on.report["rewrites"]
    x = data[1][0]
    step = float(gm.graph.find_nodes(op="call_function",
                                     target=torch.ops.quantized_decomposed.dequantize_per_tensor.default)[-1].args[1])
    assert (on(x) - gm(x)).abs().max() <= 1.01 * step
