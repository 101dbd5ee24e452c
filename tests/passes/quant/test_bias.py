"""Empirical bias correction (passes/quant/bias_correction.py) and float graph outputs
(passes/quant/float_outputs.py) on a depthwise net with skewed channel ranges."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.passes.quant import sqnr_db
from tests.passes.quant.test_cle import SkewedDW, _data

# per-tensor weights: the skewed depthwise filters round coarsely, and their rounding errors
# do not average out over 9 taps: a per-channel mean shift bias correction can remove
_SPEC = dict(mode="static", observer="minmax", weights="int8-per-tensor-symmetric")


def _quantize(m, **kw):
    calib = _data(8, 1)
    return fxpress.compress(m, calib[0], fxpress.Quantize(**_SPEC, **kw), calibration=calib)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    m = SkewedDW().eval()
    return m, _quantize(m, bias_correction=False), _quantize(m, bias_correction=True)


def test_bias_correction_structure(nets):
    """Every int8 conv gets a corrected bias buffer and a report row; weights are untouched."""
    _, plain, corrected = nets
    rows = corrected.report.sections["bias_correction"]
    assert [r["layer"] for r in rows] == ["conv", "dw", "pw"]
    assert {r.name: r.stats for r in corrected.report.passes}["quant_bias_correction"] == {"corrected": 3}
    targets = [str(n.args[2].target) for n in corrected.graph_module.graph.nodes
               if n.target is torch.ops.aten.conv2d.default]
    assert all(t.endswith("bias_corrected_int32grid") for t in targets), targets  # on the int32 grid
    wq = lambda cm: {k: v for k, v in cm.graph_module.state_dict().items() if k.endswith("_int8")}  # noqa: E731
    a, b = wq(plain), wq(corrected)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bias_correction_improves_sqnr(nets):
    """Numerics: on held-out inputs, > 1 dB closer to fp32 and the per-channel mean error of
    the output shrinks at least 3x."""
    m, plain, corrected = nets
    x = torch.cat([b[0] for b in _data(4, 7)])
    ref = m(x)
    a, b = sqnr_db(ref, plain(x)), sqnr_db(ref, corrected(x))
    assert b > a + 1, (a, b)
    mean_err = lambda y: (y - ref).mean((0, 2, 3)).abs().max()  # noqa: E731
    assert mean_err(corrected(x)) < mean_err(plain(x)) / 3
    rows = corrected.report.sections["bias_correction"]
    assert all(r["sqnr_after_db"] >= r["sqnr_before_db"] for r in rows)


def test_float_outputs():
    """float_outputs=True: the graph output is not rounded (no q/dq pair feeds only the
    output); the default keeps the pair and is further from fp32."""
    m = SkewedDW().eval()
    calib = _data(8, 1)
    qd = torch.ops.quantized_decomposed

    def last_op(cm):
        out = next(n for n in reversed(cm.graph_module.graph.nodes) if n.op == "output")
        return out.all_input_nodes[0].target
    on = fxpress.compress(m, calib[0], fxpress.Quantize(mode="static", float_outputs=True),
                          calibration=calib)
    off = fxpress.compress(m, calib[0], fxpress.Quantize(mode="static"), calibration=calib)
    assert last_op(on) is torch.ops.aten.conv2d.default
    assert last_op(off) is qd.dequantize_per_tensor.default
    x = torch.cat([b[0] for b in _data(2, 7)])
    assert sqnr_db(m(x), on(x)) > sqnr_db(m(x), off(x))


def test_bias_correction_needs_static():
    with pytest.raises(fxpress.errors.RecipeError, match="bias_correction"):
        fxpress.Quantize(mode="dynamic", bias_correction=True)
