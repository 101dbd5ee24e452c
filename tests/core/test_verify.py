"""The verifier rejects broken IR (each kind of breakage named); the printer speaks module names."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import VerificationError
from fxpress.ir import QuantSpec, format_graph, set_record, verify
from tests import models

aten = torch.ops.aten


@pytest.fixture
def ir():
    model, inputs = models.build("digits_cnn")
    return fxpress.capture(model, inputs)


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def test_clean_ir_verifies(ir):
    assert verify(ir, raise_on_error=False) == []
    verify(ir)  # no raise


def test_rejects_use_before_definition(ir):
    conv1 = _node(ir, aten.conv2d.default)
    relu = next(iter(conv1.users)).next  # a node defined after conv1
    conv1.args = (relu,) + tuple(conv1.args[1:])
    with pytest.raises(VerificationError, match="graph lint") as ei:
        verify(ir)
    assert "IR verification failed" in str(ei.value)


def test_rejects_missing_attribute_and_dangling_parameter(ir):
    del ir.conv1.bias
    ir.extra = torch.nn.Parameter(torch.zeros(3))
    problems = verify(ir, raise_on_error=False)
    assert any("reads missing attribute 'conv1.bias'" in p for p in problems)
    assert any("parameter 'extra' is not read by any node (dangling)" in p for p in problems)


def test_rejects_malformed_and_untyped_records(ir):
    conv1 = _node(ir, aten.conv2d.default)
    set_record(conv1, QuantSpec(qscheme="per_channel", axis=None))
    problems = verify(ir, raise_on_error=False)
    assert problems == ["node 'conv2d': QuantSpec per_channel needs an axis"]
    conv1.meta["fxpress"] = {**conv1.meta["fxpress"], "qspec": {"dtype": "int8"}}  # a free-form dict
    assert "not a typed record" in verify(ir, raise_on_error=False)[0]


def test_rejects_shape_inconsistency(ir):
    # swap conv2's weight for one with a different output width: the recorded shapes no longer hold
    with torch.no_grad():
        ir.conv2.weight = torch.nn.Parameter(torch.randn(8, 16, 3, 3))
        ir.conv2.bias = torch.nn.Parameter(torch.randn(8))
    problems = verify(ir, raise_on_error=False)
    assert len(problems) == 1 and problems[0].startswith("shape propagation failed")
    assert "at node 'batch_norm_1' (bn2, aten.batch_norm.default)" in problems[0]
    assert "running_mean should contain 8 elements not 32" in problems[0]
    # the probe must leave the IR's recorded metadata as it was
    assert tuple(_node(ir, aten.conv2d.default).meta["val"].shape) == (2, 16, 8, 8)


def test_shape_mismatch_is_reported_per_node(ir):
    relu = _node(ir, aten.relu.default)
    relu.meta["val"] = torch.empty(2, 99, 8, 8)
    problems = verify(ir, raise_on_error=False)
    assert problems == ["node 'relu': recorded shape (2, 99, 8, 8) but computes (2, 16, 8, 8)"]


def test_printer_uses_user_module_names_and_records(ir):
    set_record(_node(ir, aten.conv2d.default), QuantSpec(dtype="int8", qscheme="per_channel", axis=0))
    text = format_graph(ir)
    line = next(ln for ln in text.splitlines() if ln.startswith("%conv2d ="))
    assert "aten.conv2d.default(%x, conv1.weight, conv1.bias" in line
    assert "-> [2, 16, 8, 8] float32" in line and "# conv1 (Conv2d)" in line
    assert "qspec=int8/per_channel/sym" in line
    assert "fc2 (Linear)" in text and text.splitlines()[-1].startswith("return")
    assert "attr conv1.weight" not in text
    assert "%conv1_weight = attr conv1.weight -> [16, 1, 3, 3] float32" in format_graph(ir, show_params=True)
