"""Coverage section and CoverageWarning: numbers on a hand-built net, warnings that name op kinds."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxpress
from fxpress.coverage import FAMILIES


class _Net(nn.Module):
    """conv 3->16, conv 16->16 (3x3, pad 1, 8x8 images), linear 1024->10."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class _Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


# MACs at batch 2: c1 2*16*8*8 outputs x 3*3*3, c2 the same x 16*3*3, fc 2*10 x 1024
C1, C2, FC = 2048 * 27, 2048 * 144, 20 * 1024
W_C1, W_C2, W_FC = 16 * 27, 16 * 144, 10 * 1024


def _calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 8, 8, generator=g),) for _ in range(4)]


def _coverage_warnings(rec):
    return [str(w.message) for w in rec if issubclass(w.category, fxpress.CoverageWarning)]


def test_coverage_numbers_on_a_hand_built_net():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cm = fxpress.compress(_Net().eval(), (torch.randn(2, 3, 8, 8),),
                              [fxpress.Quantize(mode="static", skip=["c2"])], calibration=_calib())
    cov = cm.report["coverage"]
    assert set(cov["families"]) == set(FAMILIES)
    total = C1 + C2 + FC
    assert cov["weight_macs"] == total
    assert cov["families"]["int8"]["macs"] == pytest.approx((C1 + FC) / total)
    assert cov["families"]["float"]["macs"] == pytest.approx(C2 / total)
    assert cov["families"]["int8"]["params"] == pytest.approx((W_C1 + W_FC) / (W_C1 + W_C2 + W_FC))
    assert cov["families"]["pruned"]["macs"] == 0
    assert cov["left_float"]["conv2d"]["nodes"] == 1
    assert "policy" in cov["left_float"]["conv2d"]["reasons"]
    assert cov["before"]["macs"] == total
    # c2 (79.6 % of the MACs) is left float by the user's skip: the warning names it and why
    msgs = _coverage_warnings(rec)
    assert any("conv2d" in m and "skip" in m and "80%" in m for m in msgs), msgs
    text = str(cm.report)
    assert "| family | MACs % | params % |" in text and "| conv2d | 1 | 79.6 |" in text


def test_pruning_counts_as_pruned_and_removed_params():
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cm = fxpress.compress(_Net().eval(), (torch.randn(2, 3, 8, 8),),
                              [fxpress.ChannelPruning(ratio=0.5, round_to=1)])
    assert not _coverage_warnings(rec)  # every weight op was touched (pruned), none untouched
    cov = cm.report["coverage"]
    assert cov["left_float"]["conv2d"]["reasons"] == {"not in recipe": "no Quantize or WeightOnly entry"}
    # both convs lose output channels, the linear input columns: every weight op is pruned
    assert cov["families"]["pruned"]["macs"] == pytest.approx(1.0)
    assert cov["params_removed"] == pytest.approx(
        1 - cm.report["prune_channels"]["params_after"] / cm.report["prune_channels"]["params_before"])
    assert cov["params_removed"] > 0.3


def test_recipe_that_changes_nothing_warns_naming_the_op_kinds():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(fxpress.CoverageWarning, match=r"changed nothing.*conv2d.*not in recipe"):
        fxpress.compress(_Convs().eval(), (x,), [fxpress.ChannelPruning(ratio=0.5, exclude=["*"])])


def test_recipe_that_leaves_most_macs_float_warns_naming_the_op_kinds():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(fxpress.CoverageWarning,
                      match=r"left 9\d% of the weight-bearing MACs untouched.*conv2d.*policy"):
        cm = fxpress.compress(_Net().eval(), (x,), [fxpress.Quantize(mode="static", ops=("linear",))],
                              calibration=_calib())
    assert cm.report["coverage"]["untouched"] == pytest.approx((C1 + C2) / (C1 + C2 + FC))


def test_full_coverage_is_silent_and_summary_prints(capsys):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cm = fxpress.compress(_Net().eval(), (torch.randn(2, 3, 8, 8),),
                              [fxpress.Quantize(mode="static")], calibration=_calib())
    assert not _coverage_warnings(rec)
    text = cm.summary()
    assert "int8 100.0%" in text and "SQNR vs fp32 on the example" in text
    db = float(text.split("SQNR vs fp32 on the example: ")[1].split(" dB")[0])
    assert db > 15  # 3 int8 layers at random weights
    assert capsys.readouterr().out.strip() == text.strip()


def test_float_reasons_read_the_records_passes_leave():
    """A LayerChoice that kept a layer float reads as `latency`, a layer the sensitivity pass
    floated as `sensitivity` (records set here as those passes set them)."""
    from fxpress.coverage import coverage, snapshot
    from fxpress.ir.meta import LayerChoice, set_record
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(fxpress.capture(_Net().eval(), (x,)), (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxpress.CoverageWarning)
        cm = fxpress.compress(_Net().eval(), (x,), [fxpress.Quantize(mode="static", skip=["c2", "fc"])],
                              calibration=_calib())
    gm = cm.graph_module
    c2 = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default
              and "c2" in str(n.args[1].target))
    fc = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    set_record(c2, LayerChoice("float", ("float", "int8"), (0.10, 0.25), "onnxruntime"))
    cm.report.sections["quant_guard"] = {"float_layers": [fc.name], "float_modules": []}
    cov = coverage(gm, before, cm.recipe, cm.report)
    assert cov["left_float"]["conv2d"]["reasons"] == {
        "latency": "kept float on onnxruntime (float 0.100 ms, int8 0.250 ms)"}
    assert set(cov["left_float"]["linear"]["reasons"]) == {"sensitivity"}
    assert cov["families"]["int8"]["macs"] == pytest.approx(C1 / (C1 + C2 + FC))
