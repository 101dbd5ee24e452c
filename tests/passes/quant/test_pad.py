"""Constant pads before convs (passes/quant/pad_fold.py): folded into the conv, or int8 pads.

A TF-"same" net (asymmetric pads before strided convs, symmetric ones before depthwise convs,
one on the raw input) must leave no float pad in the IR, no Pad at all in the saved .onnx
(ORT folds the uint8 pads into QLinearConv), and lower exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.backends.base import flat_graph
from fxpress.passes.base import PassContext
from fxpress.passes.quant import sqnr_db
from fxpress.passes.quant.pad_fold import FoldPadIntoConv, PadInInt8, pad_args


def same_pads(h: int, k: int, s: int) -> list[int]:
    """TF 'same' padding (left, right, top, bottom) for a square input: extra pixel at the end."""
    out = -(-h // s)
    total = max((out - 1) * s + k - h, 0)
    return [total // 2, total - total // 2] * 2


class TFPadded(nn.Module):
    """EfficientNet-Lite / MobileNetV1(tf_padding) style: F.pad before every conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.dw = nn.Conv2d(16, 16, 3, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.down = nn.Conv2d(24, 24, 3, stride=2, groups=24)
        self.head = nn.Conv2d(24, 8, 1)

    def forward(self, x):
        x = F.relu6(self.stem(F.pad(x, same_pads(x.shape[-1], 3, 2))))
        x = F.relu6(self.dw(F.pad(x, [1, 1, 1, 1])))
        x = F.relu6(self.pw(x))
        x = F.relu6(self.down(F.pad(x, same_pads(x.shape[-1], 3, 2))))
        return self.head(x)


@pytest.fixture(scope="module")
def padded():
    torch.manual_seed(0)
    m = TFPadded().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(2, 3, 32, 32, generator=g),) for _ in range(4)]
    # float_outputs=False: the head conv's output is int8 too, so all five run as QLinearConv
    cm = fxpress.compress(m, data[0], fxpress.Quantize(mode="static", conv_add="separate",
                                                       float_outputs=False), calibration=data)
    return m, cm, data


def _pads(gm) -> list:
    return [n for n in gm.graph.nodes if pad_args(n) is not None]


def test_fold_pad_into_conv_is_exact():
    """The float rewrite: the symmetric pad becomes padding=1, the asymmetric ones stay."""
    m = TFPadded().eval()
    x = torch.randn(2, 3, 32, 32)
    gm = fxpress.capture(m, (x,))
    assert len(_pads(gm)) == 3
    res = FoldPadIntoConv().run(gm, PassContext(example_inputs=(x,)))
    assert res.stats == {"folded_pads": 1} and len(_pads(res.graph_module)) == 2
    torch.testing.assert_close(res.graph_module(x), m(x), atol=1e-5, rtol=1e-5)


def test_no_float_pad_in_ir(padded):
    """Structure: every pad left runs on the uint8 tensor with the zero point as value."""
    _, cm, _ = padded
    stats = {r.name: r.stats for r in cm.report.passes}
    assert stats["quant_fold_pad"] == {"folded_pads": 1}
    assert stats["quant_pad_int8"] == {"int8_pads": 2, "float_pads_left": 0}
    pads = _pads(cm.graph_module)
    assert len(pads) == 2
    for p in pads:
        assert p.meta["val"].dtype == torch.uint8
        (dq,) = p.users
        assert dq.target is torch.ops.quantized_decomposed.dequantize_per_tensor.default
        assert p.args[2] == dq.args[2]          # padded with the zero point, i.e. 0.0
        assert next(iter(dq.users)).target is torch.ops.aten.conv2d.default


def test_pads_int8_close_to_float(padded):
    """Numerics: the int8 net stays close to fp32 (int8 pads are exact, only roundings differ)."""
    m, cm, data = padded
    x = data[0][0]
    assert sqnr_db(m(x), cm(x)) > 25


def test_saved_onnx_has_no_pad_and_is_exact(padded, tmp_path):
    """ORT: no Pad node in the saved .onnx (folded into QLinearConv's pads), exact vs the IR."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    _, cm, data = padded
    run = fxpress.lower(cm, backend="onnxruntime", example_inputs=data[0])
    run.save(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "Pad" not in ops and ops.count("Conv") == 5
    assert run.report["rewrites"]["pad_into_conv"] == 2
    assert run.report["kernels"]["QLinearConv"] == 5
    out_dq = [n for n in cm.graph_module.graph.nodes
              if n.target is torch.ops.quantized_decomposed.dequantize_per_tensor.default][-1]
    step = out_dq.args[1]
    for (x,) in data[:2]:
        # the same int32 sums; requantization may round a tie the other way: <= 1 step
        ref, got = cm(x), run(x)
        assert (got - ref).abs().max() <= step * 1.001 and sqnr_db(ref, got) > 45


def test_inductor_runs_int8_pads(padded):
    """Inductor compiles the uint8 pads (and the convs reading them) to the IR's numerics."""
    _, cm, data = padded
    run = fxpress.lower(cm, backend="inductor", example_inputs=data[0])
    x = data[1][0]
    assert sqnr_db(cm(x), run(x)) > 30


@pytest.mark.slow
def test_tvm_runs_int8_pads(padded):
    pytest.importorskip("tvm")
    _, cm, data = padded
    run = fxpress.lower(cm, backend="tvm", example_inputs=data[0])
    x = data[1][0]
    assert sqnr_db(cm(x), run(x)) > 30


def test_nonzero_pad_value_quantizes_exactly():
    """quantize(pad(x, v)) == pad(quantize(x), quantize(v)) for v != 0 too."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(F.pad(x, [0, 1, 0, 1], value=0.75))
    m = M().eval()
    x = torch.randn(1, 3, 16, 16)
    cm = fxpress.compress(m, (x,), fxpress.Quantize(mode="static"), calibration=[(x,)])
    ref = fxpress.compress(m, (x,), fxpress.Quantize(mode="static", pads="float"), calibration=[(x,)])
    assert len(_pads(ref.graph_module)) == 1 and ref.graph_module.graph.find_nodes(
        op="call_function", target=torch.ops.aten.pad.default)
    torch.testing.assert_close(cm(x), ref(x), atol=0, rtol=0)


def test_pads_option_checked():
    with pytest.raises(fxpress.errors.RecipeError, match="pads"):
        fxpress.Quantize(pads="bf16")
