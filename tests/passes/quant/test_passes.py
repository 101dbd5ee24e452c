"""Config validation, bad calibration, folding rules, sharing, skip/overrides, sensitivity, fuzz."""
from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings

import fxpress
from fxpress.errors import CalibrationError, InputError, PassError, RecipeError
from fxpress.passes.base import PassContext
from fxpress.passes.quant import FoldQDQ, sqnr_db
from tests import fuzz

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16 * 8 * 8, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y) + self.c(y)                 # residual-style add of two convs
        w = torch.cat([z, y], 1)                  # cat of two quantized tensors
        return self.head(torch.flatten(w, 1))


def _data(n=4, b=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 8, 8, generator=g),) for _ in range(n)]


def _ops(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,field", [
    (dict(mode="int4"), "mode"),
    (dict(weights="uint8-per-channel-symmetric"), "weights"),
    (dict(activations="int8-per-channel-affine"), "activations"),
    (dict(observer="lsq"), "observer"),                         # lsq is for QAT
    (dict(mode="qat", observer="histogram"), "observer"),
    (dict(mode="dynamic", activations="none"), "activations"),
    (dict(weights="none", activations="none"), "weights"),
    (dict(percentile=30.0), "percentile"),
    (dict(calib_batches=0), "calib_batches"),
    (dict(ops=("conv", "softmax")), "ops"),
    (dict(overrides={"fc": "int4"}), "overrides['fc'].weights"),
    (dict(mode="dynamic", keep_float=2), "keep_float"),
    (dict(smooth=1.5), "smooth"),
])
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(RecipeError) as e:
        fxpress.Quantize(**kwargs)
    assert e.value.field == field


def test_defaults_and_recipe_roundtrip(tmp_path):
    q = fxpress.Quantize(mode="static")
    assert (q.weights, q.activations, q.observer) == (
        "int8-per-channel-symmetric", "uint8-per-tensor-affine", "auto")
    assert q.specs_for("layer1.conv")[1].observer == "histogram"   # "auto" off transformers
    w, a = q.specs_for("layer1.conv")
    assert (w.dtype, w.qscheme, w.symmetric, w.quant_min) == ("int8", "per_channel", True, -127)
    assert (a.dtype, a.symmetric, a.quant_min, a.quant_max) == ("uint8", False, 0, 255)
    r = fxpress.Recipe([fxpress.Quantize(mode="static", skip=("head",),
                                         overrides={"c": {"weights": "int8-per-tensor-affine"}})])
    r.save(tmp_path / "r.yaml")
    assert fxpress.Recipe.load(tmp_path / "r.yaml") == r


# ---------------------------------------------------------------- bad calibration
def test_empty_calibration_is_an_error():
    with pytest.raises(PassError) as e:
        fxpress.compress(Residual(), _data(1)[0], fxpress.Quantize(), calibration=[])
    assert isinstance(e.value.cause, CalibrationError)


def test_missing_calibration_is_an_error():
    with pytest.raises(PassError) as e:
        fxpress.compress(Residual(), _data(1)[0], fxpress.Quantize())
    assert isinstance(e.value.cause, CalibrationError)


@pytest.mark.parametrize("bad,what", [
    (torch.randn(8, 3, 9, 8), "shape"), (torch.randn(8, 3, 8, 8).double(), "dtype"),
])
def test_wrong_batch_names_the_input(bad, what):
    with pytest.raises(PassError) as e:
        fxpress.compress(Residual(), _data(1)[0], fxpress.Quantize(), calibration=[_data(1)[0], (bad,)])
    cause = e.value.cause
    assert isinstance(cause, InputError) and cause.input_name == "x" and cause.index == 1
    assert what in str(cause) and "'x'" in str(cause)


def test_nan_reaching_an_observer_names_the_node():
    m = Residual()
    with torch.no_grad():
        m.c.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(PassError) as e:
        fxpress.compress(m, _data(1)[0], fxpress.Quantize(), calibration=_data(2))
    assert isinstance(e.value.cause, CalibrationError)
    assert "NaN" in str(e.value.cause) and "node" in str(e.value.cause)


# ---------------------------------------------------------------- structure and sharing
def test_shared_ranges_for_add_and_cat_and_numerics():
    m = Residual().eval()
    x = _data(1)[0][0]
    cm = fxpress.compress(m, x, fxpress.Quantize(observer="minmax", conv_add="fuse"),
                          calibration=_data())
    gm = cm.graph_module
    add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
    cat = next(n for n in gm.graph.nodes if n.target is aten.cat.default)
    a0, a1 = add.args
    # conv + add (torchao's x86 pairing): the first conv feeds the add in float (Inductor fuses
    # the add into the int8 conv), the other input is quantized, and so is the add's output
    assert a0.target is aten.conv2d.default and a0.args[0].target is qd.dequantize_per_tensor.default
    assert a1.target is qd.dequantize_per_tensor.default
    assert all(u.target is qd.quantize_per_tensor.default for u in add.users)
    qs = [t.args[1:3] for t in cat.args[0]] + [next(iter(cat.users)).args[1:3]]
    assert all(q == qs[0] for q in qs)                         # cat inputs and output: one range
    with torch.no_grad():
        assert sqnr_db(m(x), cm(x)) >= 25.0


def test_skip_and_overrides():
    m = Residual().eval()
    q = fxpress.Quantize(skip=("head",), overrides={"c": "int8-per-tensor-symmetric"})
    cm = fxpress.compress(m, _data(1)[0], q, calibration=_data())
    gm = cm.graph_module
    lin = next(n for n in gm.graph.nodes if n.target is aten.linear.default)
    assert lin.args[1].op == "get_attr"                        # head weight stays float
    convs = {n.args[1].args[0].target.split(".")[0]: n.args[1] for n in gm.graph.nodes
             if n.target is aten.conv2d.default}
    assert convs["c"].target is qd.dequantize_per_tensor.default
    assert convs["a"].target is qd.dequantize_per_channel.default


def _qdq_graph():
    """x -> q1/dq1 -> q2/dq2 (other params) -> q3/dq3 (== q2's) -> linear with fp32 weight quantize."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            u8 = torch.uint8
            y = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, 0.05, 128, 0, 255, u8), 0.05, 128, 0, 255, u8)
            y = qd.dequantize_per_tensor(qd.quantize_per_tensor(y, 0.03, 120, 0, 255, u8), 0.03, 120, 0, 255, u8)
            y = qd.dequantize_per_tensor(qd.quantize_per_tensor(y, 0.03, 120, 0, 255, u8), 0.03, 120, 0, 255, u8)
            w = qd.dequantize_per_tensor(qd.quantize_per_tensor(self.w, 0.02, 0, -127, 127, torch.int8),
                                         0.02, 0, -127, 127, torch.int8)
            return torch.nn.functional.linear(y, w)
    return M().eval()


def test_fold_rules_fire_and_keep_numerics():
    m = _qdq_graph()
    x = torch.randn(2, 6)
    gm = fxpress.capture(m, (x,))
    ref = gm(x)
    res = FoldQDQ().run(gm, PassContext(example_inputs=(x,)))
    assert res.stats == {"constant_quantize": 1, "redundant_dq_q": 1, "requantize": 1}
    ops = _ops(res.graph_module)
    assert ops[qd.quantize_per_tensor.default] == 1            # x -> one q (0.03, 120) -> dq
    assert ops[qd.dequantize_per_tensor.default] == 2          # activation + int8 weight
    w = next(n for n in res.graph_module.graph.nodes if n.op == "get_attr")
    assert res.graph_module.get_buffer(w.target).dtype == torch.int8
    # weight folding is exact; dropping the first rounding moves values by < one 0.05 step
    assert torch.allclose(res.graph_module(x), ref, atol=0.05 * 6 * 0.02 * 127)


# ---------------------------------------------------------------- sensitivity and guard
def test_sensitivity_and_accuracy_guard():
    m = Residual().eval()
    data = _data()
    ref_out = [m(*b) for b in data]

    def metric(module):  # higher is better: -MSE against fp32 on the calibration batches
        with torch.no_grad():
            return -float(sum(((module(*b) - r) ** 2).mean() for b, r in zip(data, ref_out)))

    cm = fxpress.compress(m, data[0], fxpress.Quantize(sensitivity=True), calibration=data)
    rows = cm.report.sections["quant_sensitivity"]
    assert {r["module"] for r in rows} >= {"a", "b", "c", "head"}
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    q_err = -metric(cm)
    guarded = fxpress.compress(m, data[0], fxpress.Quantize(guard_metric=metric,
                                                            guard_budget=q_err / 4),
                               calibration=data)
    g = guarded.report.sections["quant_guard"]
    assert g["within_budget"] and len(g["float_layers"]) >= 1
    assert g["float_modules"][0] == rows[0]["module"]          # most sensitive goes first
    assert -metric(guarded) <= q_err / 4 + 1e-9
    kept = fxpress.compress(m, data[0], fxpress.Quantize(keep_float=1), calibration=data)
    assert _ops(kept.graph_module)[qd.dequantize_per_channel.default] == 3


# ---------------------------------------------------------------- fuzzed graphs
@settings(max_examples=6, deadline=None, derandomize=True)
@given(net=fuzz.nets(max_blocks=2))
def test_fuzzed_graphs_quantize_with_sqnr(net):
    model, inputs = net
    inputs = tuple(inputs)
    cal = [inputs]
    if inputs[0].is_floating_point():
        g = torch.Generator().manual_seed(0)
        cal += [tuple(t + 0.1 * torch.randn(t.shape, generator=g) for t in inputs)]
    cm = fxpress.compress(model, inputs, fxpress.Quantize(observer="minmax"), calibration=cal)
    ops = _ops(cm.graph_module)
    assert ops[qd.dequantize_per_channel.default] + ops[qd.dequantize_per_tensor.default] > 0
    with torch.no_grad():
        assert sqnr_db(model(*inputs), cm(*inputs)) >= 20.0
