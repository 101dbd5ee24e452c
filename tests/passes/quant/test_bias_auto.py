"""`Quantize(bias_correction="auto")`, the default: bias correction on static graphs with a
depthwise conv and calibration data, nothing elsewhere (passes/quant/bias_correction.auto_skip)."""
from __future__ import annotations

import torch
import torch.nn as nn

import fxpress
from fxpress.passes.quant import sqnr_db
from tests.passes.quant.test_cle import SkewedDW, _data

_SPEC = dict(mode="static", observer="minmax", weights="int8-per-tensor-symmetric")


class PlainConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _compress(m, **kw):
    calib = _data(8, 1)
    return fxpress.compress(m, calib[0], fxpress.Quantize(**_SPEC, **kw), calibration=calib)


def _stats(cm):
    return {r.name: r.stats for r in cm.report.passes}.get("quant_bias_correction")


def test_auto_corrects_depthwise_nets_only():
    """Structure: the depthwise net's three convs get corrected biases by default; a net of plain
    convs runs the pass, which says why it did nothing; False leaves the pass out; with AdaRound
    "auto" corrects inside AdaRound's sweep (against the float weights), not as a pass after it."""
    torch.manual_seed(0)
    assert fxpress.Quantize().bias_correction == "auto"
    dw = _compress(SkewedDW().eval())
    assert _stats(dw) == {"corrected": 3}
    assert [r["layer"] for r in dw.report.sections["bias_correction"]] == ["conv", "dw", "pw"]
    plain = _compress(PlainConvs().eval())
    assert _stats(plain) == {"corrected": 0, "skipped": "no depthwise conv"}
    assert all(not str(n.target).endswith("bias_corrected") for n in plain.graph_module.graph.nodes)
    assert _stats(_compress(SkewedDW().eval(), bias_correction=False)) is None
    ada = _compress(SkewedDW().eval(), adaround=5)
    assert _stats(ada) is None
    assert all("bias_shift_max" in r for r in ada.report.sections["adaround"])


def test_auto_is_bias_correction_on_a_depthwise_net():
    """Numerics: the default computes what bias_correction=True does (bit-equal) and is > 1 dB
    closer to fp32 than bias_correction=False on held-out inputs."""
    torch.manual_seed(0)
    m = SkewedDW().eval()
    auto, on, off = _compress(m), _compress(m, bias_correction=True), _compress(m, bias_correction=False)
    x = torch.cat([b[0] for b in _data(4, 7)])
    with torch.no_grad():
        ref, ya = m(x), auto(x)
        assert torch.equal(ya, on(x))
        assert sqnr_db(ref, ya) > sqnr_db(ref, off(x)) + 1
