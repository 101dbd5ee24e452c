"""Accuracy-safe defaults (issue 23 item 3, issue 24 item 2): what `Quantize(mode=...)` with no
other argument chooses, and that it is measured, not assumed.

- static: per-node sensitivity on the calibration batches keeps float the outliers of the
  ranking (a residual add whose range is set by an outlier channel), named with their dB in
  report["quant_float_nodes"]; transformer activations get the min-max observer.
- dynamic: SmoothQuant (alpha 0.75) on transformer linears; activation x activation matmuls
  stay float. Neither touches a conv net.
The real-MiniLM bars are the slow tests in tests/backends/test_minilm_int8.py.
"""
from __future__ import annotations

import torch

import fxpress
from tests.models import bert

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


def sqnr(ref, y) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-20)))


class _OutlierResidual(torch.nn.Module):
    """A residual add on a stream with one outlier channel (as ViT/YOLOS residual streams have):
    a uint8 range for the add is set by the outlier, and the small channels the next layer reads
    fall to a few steps. The linears read outlier-free slices: int8 is harmless for them."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.branch = torch.nn.Linear(d - 1, d)
        self.out = torch.nn.Linear(d - 1, 8)

    def forward(self, x):
        y = x + self.branch(x[..., 1:])          # the residual add
        return self.out(y[..., 1:])


def _calib(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 10, 32, generator=g)
        x[..., 0] += 400.0                       # the outlier channel of the residual stream
        out.append((x,))
    return out


def test_static_default_keeps_the_destructive_residual_add_float_and_names_its_cost():
    torch.manual_seed(0)
    model = _OutlierResidual().eval()
    data = _calib()
    x = _calib(1, seed=7)[0]
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=data)
    off = fxpress.compress(model, x, fxpress.Quantize(mode="static", float_policy="off"),
                           calibration=data)
    kept = cm.report.sections["quant_float_nodes"]
    assert [k["op"] for k in kept] == ["add.Tensor"], kept
    assert kept[0]["cost_db"] < 20                   # what int8 of that add alone would cost
    policy = cm.report.sections["quant_float_policy"]
    assert policy["after_sqnr_db"] > policy["all_quantized_sqnr_db"] + 10, policy
    with torch.no_grad():
        ref = model(*x)
        good, bad = sqnr(ref, cm(*x)), sqnr(ref, off(*x))
    assert good > 25 and good > bad + 10, (good, bad)
    # every linear is still int8: only the add left float
    lin = [n for n in cm.graph_module.graph.nodes if n.target is aten.linear.default]
    assert all(n.args[1].target is qd.dequantize_per_channel.default for n in lin)


def test_default_observers_and_smoothing_by_model_kind():
    from fxpress.passes.quant.config import Quantize
    static, dynamic = Quantize(mode="static"), Quantize(mode="dynamic")
    assert static.specs_for("x", transformer=True)[1].observer == "minmax_tail"
    assert static.specs_for("x", transformer=False)[1].observer == "histogram"
    assert (static.smooth_alpha(True), dynamic.smooth_alpha(True)) == (0.5, 0.75)
    assert static.smooth_alpha(False) is None and Quantize(smooth=0.3).smooth_alpha(False) == 0.3


def test_dynamic_default_on_a_transformer_smooths_and_leaves_attention_matmuls_float():
    model = bert(hidden=32, layers=2, heads=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    mask = torch.ones(4, 16, dtype=torch.long)
    cm = fxpress.compress(model, (ids, mask), fxpress.Quantize(mode="dynamic"))  # no calibration
    stats = {p.name: p.stats for p in cm.report.passes}
    assert stats["quant_smooth"] == {"smoothed": 8, "alpha": 0.75}
    left = stats["quant_annotate"]["left"]
    assert len(left) == 4 and all(r["op"] == "matmul" for r in left)   # 2 per layer
    targets = [n.target for n in cm.graph_module.graph.nodes]
    assert targets.count(qd.choose_qparams.tensor) == 8                # one per linear input group
    x = (torch.randint(0, 128, (3, 16), generator=g), torch.ones(3, 16, dtype=torch.long))
    with torch.no_grad():
        assert sqnr(model(*x), cm(*x)) > 35                            # measured 46 dB


def test_an_op_nothing_reads_is_not_annotated_so_calibration_does_not_fail():
    """torch.export leaves some dead ops (HF YOLOS's position-embedding interpolation: a cat
    with no user). Before: the cat's inputs got observers no batch reached, and the default
    static recipe failed "the observer of node 'unsqueeze_1' saw no data"."""
    from fxpress.passes.base import PassContext
    from fxpress.passes.manager import PassManager
    torch.manual_seed(0)
    model = _OutlierResidual().eval()
    data = _calib()
    gm = fxpress.capture(model, data[0])
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        half = gm.graph.call_function(aten.mul.Tensor, (x, 0.5))
    with gm.graph.inserting_after(half):
        dead = gm.graph.call_function(aten.cat.default, ([half, x], 2))
    gm.recompile()
    out, report = PassManager(fxpress.Quantize(mode="static").passes()).run(
        gm, PassContext(example_inputs=data[0], calibration=data))
    assert dead.name not in {n.name for n in out.graph.nodes}        # dropped with its inputs
    assert "cat" not in {p.name: p.stats for p in report.passes}["quant_annotate"]["annotated"]
    with torch.no_grad():
        assert sqnr(model(*data[0]), out(*data[0])) > 25
