"""Cross-layer equalization (passes/quant/cle.py) on a depthwise net with skewed channel ranges."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.passes.quant import sqnr_db
from fxpress.passes.quant.cle import equalize_pairs


class SkewedDW(nn.Module):
    """conv -> ReLU6 -> depthwise conv -> ReLU -> 1x1 conv whose first conv's output channels
    span three decades of range (the depthwise filters compensate, so the function is tame)."""

    def __init__(self, c: int = 16, act=F.relu6):
        super().__init__()
        self.act = act
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, 8, 1)
        g = torch.Generator().manual_seed(3)
        scale = torch.logspace(-3, 0, c)[torch.randperm(c, generator=g)]
        with torch.no_grad():
            self.conv.weight.mul_(scale.view(-1, 1, 1, 1))
            self.conv.bias.mul_(scale).abs_()
            self.dw.weight.div_(scale.view(-1, 1, 1, 1))

    def forward(self, x):
        return self.pw(F.relu(self.dw(self.act(self.conv(x)))))


def _data(n: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 16, 16, generator=g),) for _ in range(n)]


def _quantize(m, **kw):
    calib = _data(8, 1)
    kw.setdefault("bias_correction", False)  # CLE alone (the default corrects depthwise nets)
    return fxpress.compress(m, calib[0], fxpress.Quantize(mode="static", observer="minmax", **kw),
                            calibration=calib)


def test_pairs_found_and_exact_in_float():
    """Structure: one conv -> ReLU6 -> depthwise pair; the rescaled float IR is the same function."""
    m = SkewedDW().eval()
    gm = fxpress.capture(m, _data(1, 0)[0])
    (c1, act, c2), = equalize_pairs(gm)
    assert act.target is torch.ops.aten.relu6.default and c2.args[1].target == "dw.weight"
    cm = _quantize(m, equalize=True)
    rows = cm.report.sections["cle"]
    assert len(rows) == 1 and rows[0]["range_spread_after"] < rows[0]["range_spread_before"] / 5
    stats = {r.name: r.stats for r in cm.report.passes}
    assert stats["quant_cle"] == {"equalized": 1, "pairs": 1}


def test_float_function_unchanged():
    """Numerics: equalization alone (no rounding) keeps the model's function (ReLU and ReLU6)."""
    from fxpress.passes.base import PassContext
    from fxpress.passes.cleanup import FoldBatchNorm
    from fxpress.passes.quant.cle import CrossLayerEqualize
    for act in (F.relu, F.relu6):
        m = SkewedDW(act=act).eval()
        x = _data(1, 0)[0]
        gm = fxpress.capture(m, x)
        gm = FoldBatchNorm().run(gm, PassContext(example_inputs=x)).graph_module
        ctx = PassContext(example_inputs=x, calibration=_data(8, 1))
        res = CrossLayerEqualize(fxpress.Quantize(mode="static")).run(gm, ctx)
        assert res.stats["equalized"] == 1
        for (xe,) in _data(2, 5):
            assert sqnr_db(m(xe), res.graph_module(xe)) > 80


@pytest.mark.parametrize("act", [F.relu, F.relu6])
def test_cle_improves_sqnr(act):
    """Numerics: on held-out inputs the equalized int8 net is > 3 dB closer to fp32."""
    torch.manual_seed(0)
    m = SkewedDW(act=act).eval()
    plain, cle = _quantize(m), _quantize(m, equalize=True)
    x = torch.cat([b[0] for b in _data(4, 7)])
    ref = m(x)
    a, b = sqnr_db(ref, plain(x)), sqnr_db(ref, cle(x))
    assert b > a + 3, (a, b)


def test_equalize_needs_static():
    with pytest.raises(fxpress.errors.RecipeError, match="equalize"):
        fxpress.Quantize(mode="dynamic", equalize=True)
