"""lower() checks its artefact against the IR: report['check'], and LoweringError at the node
where a (deliberately broken) translation makes them part."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress

pytest.importorskip("onnxruntime")


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _sign_flipping_relu(x):
    from onnxscript import opset20 as op
    return op.Neg(op.Relu(x))


@pytest.fixture
def broken_relu(monkeypatch):
    """A test-only ORT translation of aten.relu that flips its sign (registered here only)."""
    from fxpress.backends.onnx import export, qdq
    monkeypatch.setitem(qdq.TRANSLATIONS, torch.ops.aten.relu.default, _sign_flipping_relu)
    export._registry.cache_clear()
    yield
    monkeypatch.undo()
    export._registry.cache_clear()


def test_lowering_records_its_check():
    torch.manual_seed(0)
    run = fxpress.lower(_MLP().eval(), "onnxruntime", example_inputs=(torch.randn(4, 16),))
    chk = run.report["check"]
    assert chk["threshold_db"] == 20.0
    assert chk["sqnr_db"] > 60  # fp32 ORT vs the fp32 IR


def test_broken_translation_raises_lowering_error_naming_the_node(broken_relu):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    with pytest.raises(fxpress.LoweringError, match=r"first node where they part: 'relu'") as e:
        fxpress.lower(_MLP().eval(), "onnxruntime", example_inputs=(x,))
    assert e.value.node_name == "relu"
    assert e.value.sqnr_db < 20
    # check=False hands the wrong artefact back, as asked, with the check marked skipped
    run = fxpress.lower(_MLP().eval(), "onnxruntime", example_inputs=(x,), check=False)
    assert run.report["check"] == {"skipped": True}
